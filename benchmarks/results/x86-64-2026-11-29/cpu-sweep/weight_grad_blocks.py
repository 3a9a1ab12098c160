import torch, torch.utils.benchmark as tb
torch.manual_seed(0)
for M,N,widths in ((1024,256,[25,51,76,104]),(1024,256,[80,176]),(4096,30,[10,20]),(4096,256,[25,51,76,104]),(1024,256,[64,64,128]),(1024,256,[8,248]),(4096,30,[3,6,9,12]),(64,10,[1,2,3,4])):
    K=sum(widths)
    xs=[torch.randn(M,w) for w in widths]
    G=torch.randn(M,N)
    gw=torch.empty(N,K)
    def a(): torch.mm(G.t(), torch.cat(xs,1), out=gw)
    def b():
        o=0
        for x in xs:
            torch.mm(G.t(),x,out=gw.narrow(1,o,x.shape[1])); o+=x.shape[1]
    res=[]
    for f in (a,b):
        t=tb.Timer(stmt="f()",globals={"f":f},num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=0.4)
        res.append(round(t.median*1e6,1))
    print(M,N,widths, 'cat+mm',res[0],'per-block',res[1])
