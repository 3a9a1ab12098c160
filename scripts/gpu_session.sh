#!/usr/bin/env bash
# A GPU session in one command: scripts/gpu_check.sh, then scripts/gpu_profile.sh on the same
# machine while it is warm, within FUSEDSKIP_SESSION_BUDGET_S (default 570 s, under a 10-minute
# call). The profile gets FUSEDSKIP_PROFILE_BUDGET_S of it (default 150), the check the rest. Both
# write their folders under WORK (default /tmp/gpu-session); $OUT gets six files, for a runner
# that brings back only a few: each one's archive (check.tgz, profile.tgz), summary
# (check-summary.md, ncu-summary.md) and console output (check.out, profile.out).
#
#   FUSEDSKIP_PREBUILT=1 OUT=/somewhere/few-files bash scripts/gpu_session.sh
#
# Exit status: gpu_check.sh's (0 all passed, 3 all that ran passed, 2 no GPU, else 1), made 3
# where the check passed and the profile left something out (its 3: the budget; its 2: no ncu),
# and 1 where the check passed and the profile failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-session-$(date +%Y-%m-%d)}"
WORK="${WORK:-/tmp/gpu-session}"
TOTAL="${FUSEDSKIP_SESSION_BUDGET_S:-570}"
PROFILE_BUDGET="${FUSEDSKIP_PROFILE_BUDGET_S:-150}"
mkdir -p "$OUT" "$WORK"
rm -rf "$WORK/check" "$WORK/profile"
rm -f "$OUT"/{check.tgz,profile.tgz,check-summary.md,ncu-summary.md,check.out,profile.out}

# 10 s kept for the profile's archive and the closing lines.
# (ARCHIVE before OUT: a later assignment of the line would see the check's OUT.)
ARCHIVE="$OUT/check.tgz" OUT="$WORK/check" \
  FUSEDSKIP_CHECK_BUDGET_S=$((TOTAL - PROFILE_BUDGET - 10)) bash scripts/gpu_check.sh \
  > "$OUT/check.out" 2>&1
check_rc=$?
cp "$WORK/check/summary.md" "$OUT/check-summary.md" 2>/dev/null

# The profile measures the build the check loaded: none where that failed, no GPU where none.
profile_rc=0
if grep -q "^| build | rc=0 " "$WORK/check/summary.md" 2>/dev/null; then
  left=$((TOTAL - SECONDS - 10))
  OUT="$WORK/profile" FUSEDSKIP_PROFILE_BUDGET_S=$((left < PROFILE_BUDGET ? left : PROFILE_BUDGET)) \
    bash scripts/gpu_profile.sh > "$OUT/profile.out" 2>&1
  profile_rc=$?
  tar czf "$OUT/profile.tgz" -C "$WORK" profile
  cp "$WORK/profile/ncu-summary.md" "$OUT/" 2>/dev/null
else
  echo "gpu_session: no profile, the check's build did not pass (check-summary.md)" \
    > "$OUT/profile.out"
fi

cat "$OUT/check-summary.md" 2>/dev/null
echo "profile: rc=$profile_rc ($OUT/profile.out)"
if ((check_rc == 0)); then
  case $profile_rc in
    0) ;;
    2 | 3) check_rc=3 ;;
    *) check_rc=1 ;;
  esac
fi
exit $check_rc
