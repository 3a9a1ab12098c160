import torch, torch.utils.benchmark as tb
from fusedskip.bench import residual_mlp, unet_mlp
for name, make in (("unet", lambda f: unet_mlp(f,128)), ("resid", lambda f: residual_mlp(f,128,16))):
    steps={}
    for fused in (False, True):
        torch.manual_seed(0)
        m=make(fused); opt=torch.optim.SGD(m.parameters(), lr=1e-3)
        x=torch.randn(1024,128)
        def step(m=m,opt=opt,x=x):
            opt.zero_grad(set_to_none=True); m(x).float().square().mean().backward(); opt.step()
        def fwd(m=m,x=x):
            with torch.no_grad(): m(x)
        steps[fused]=(step,fwd)
    for rnd in range(3):
        for fused in (False, True):
            for kind,f in zip(("step","fwd"),steps[fused]):
                t=tb.Timer(stmt="f()",globals={"f":f},num_threads=2).blocked_autorange(min_run_time=0.5)
                print(name, rnd, "fused" if fused else "eager", kind, round(t.median*1e6))
