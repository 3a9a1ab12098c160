import torch, torch.utils.benchmark as tb
torch.manual_seed(0)
M,N=4096,30
for widths in ([3,6,9,12],[10,20],[25,51,76,104]):
    K=sum(widths)
    big=torch.randn(M,K+7)
    xs=[]; o=0
    for w in widths: xs.append(torch.randn(M,w)); 
    G=torch.randn(M,N)
    gw=torch.empty(N,K); gwt=torch.empty(K,N)
    def a():
        torch.mm(G.t(), torch.cat(xs,1), out=gw)
    def b():
        o=0
        for x in xs:
            blk=gw.narrow(1,o,x.shape[1]); torch.mm(G.t(),x,out=blk); o+=x.shape[1]
    def c():
        o=0
        for x in xs:
            blk=gwt.narrow(0,o,x.shape[1]); torch.mm(x.t(),G,out=blk); o+=x.shape[1]
        gw.copy_(gwt.t())
    def cat(): torch.cat(xs,1)
    ref=torch.mm(G.t(), torch.cat(xs,1))
    for f in (a,b,c):
        gw.zero_(); f(); assert torch.allclose(gw,ref,atol=1e-3), f.__name__
    for f in (cat,a,b,c):
        t=tb.Timer(stmt="f()",globals={"f":f},num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=0.5)
        print(widths, f.__name__, round(t.median*1e6,1))
