import torch, timeit, fusedskip, torch.nn.functional as F
from fusedskip import reference, modules, functional
from torch.overrides import has_torch_function, has_torch_function_variadic
torch.set_num_threads(1)
x=torch.randn(64,10); s=torch.randn(64,10)
fl=fusedskip.LinearReLUResidual(10,10); fc=fusedskip.ConcatLinear([10,10],10,activation="relu")
lin=torch.nn.Linear(10,10); lin2=torch.nn.Linear(20,10)
w,b=fl.weight,fl.bias
def t(name, f, n=20000):
    best=min(timeit.repeat(f, number=n, repeat=7))/n*1e6
    print(f"{name:45s} {best:6.2f} us")
with torch.no_grad():
    t("eager relu(lin(x))+x", lambda: torch.relu(lin(x))+x)
    t("module fl(x, residual=x)", lambda: fl(x, residual=x))
    t("fl.forward(x, x)", lambda: fl.forward(x, x))
    t("linear_relu_residual_layer", lambda: modules.linear_relu_residual_layer(x,w,b,x))
    t("reference.linear_relu_residual", lambda: reference.linear_relu_residual(x,w,b,x))
    t("raw F ops", lambda: torch.relu(F.linear(x,w,b))+x)
    t("eager relu(lin2(cat))", lambda: torch.relu(lin2(torch.cat([x,s],-1))))
    t("module fc(x, s)", lambda: fc(x, s))
    t("check_layer_inputs", lambda: reference.check_layer_inputs((x,s),[10,10],"ConcatLinear"))
    t("linear_concat_layer", lambda: modules.linear_concat_layer((x,s),fc.weight,fc.bias,activation="relu"))
    t("reference.linear_concat", lambda: reference.linear_concat((x,s),fc.weight,fc.bias,activation="relu"))
    t("has_torch_function_variadic 4", lambda: has_torch_function_variadic(x,w,b,x))
    t("torch.jit.is_tracing", lambda: torch.jit.is_tracing())
    t("_any_autocast", lambda: reference._any_autocast())
    t("check_call", lambda: reference.check_call([x],w,b,x))
    t("is_compiling", lambda: functional.is_compiling())
    t("_use_fused", lambda: modules._use_fused(x))
