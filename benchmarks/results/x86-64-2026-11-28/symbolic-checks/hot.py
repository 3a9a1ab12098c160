import torch, fusedskip, timeit, sys
torch.set_num_threads(1)
x=torch.randn(64,10); w=torch.randn(10,10); b=torch.randn(10); r=torch.randn(64,10)
xs=[torch.randn(64,3), torch.randn(64,7)]
f1=lambda: fusedskip.linear_relu_residual(x,w,b,r)
f2=lambda: fusedskip.linear_concat(xs,w,b)
with torch.no_grad():
    for name,f in (("relu_add",f1),("concat2",f2)):
        for _ in range(1000): f()
        best=min(min(timeit.repeat(f, number=2000, repeat=5)) for _ in range(3))/2000*1e6
        print(sys.argv[1], name, f"{best:.3f} us")
