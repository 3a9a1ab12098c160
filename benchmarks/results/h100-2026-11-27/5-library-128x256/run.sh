O=$OUT/r; mkdir -p $O; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FUSEDSKIP_EXPECT_CUDA_BUILD=1 FUSEDSKIP_EXPECT_CUTLASS=1
KT="python3 benchmarks/gpu_kernel_times.py --out $O"
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import fusedskip,torch;print(torch.__version__, fusedskip.cutlass_built())"; } > $O/env.txt 2>&1
timeout 100 python3 -m pytest tests -m "cuda or build" -q -ra -p no:cacheprovider > $O/cuda_tests.log 2>&1; echo tests rc=$?; tail -n 4 $O/cuda_tests.log
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 python3 tests/cuda_smoke.py cutlass > $O/memcheck_cutlass.log 2>&1; echo memcheck rc=$?; tail -n 3 $O/memcheck_cutlass.log
timeout 50 $KT --op relu_add --sizes 4096x1024x1024,8192x4096x4096 --providers fused,fused-cutlass,fused-gemm_epilogue,gemm > $O/kt_large.log 2>&1; echo kt1 rc=$?
timeout 60 $KT --op relu_add --sizes 4096x512x512,8192x512x512,16384x1024x1024,65536x256x256,65536x1024x1024 --providers fused-cutlass,fused-gemm_epilogue > $O/kt_mid.log 2>&1; echo kt2 rc=$?
timeout 30 $KT --op relu_add --mode forward --sizes 65536x30x30,64x30x30 --providers fused > $O/kt_narrow.log 2>&1
timeout 30 $KT --op relu_add --mode forward+backward --sizes 65536x30x30,64x30x30 --providers fused >> $O/kt_narrow.log 2>&1; echo kt3 rc=$?
grep -h "^###\|^host\|tile_gemm\|split_sum\|device_kernel\|nvjet\|forward_epi" $O/kt_narrow.log $O/kt_mid.log | cut -c1-150
