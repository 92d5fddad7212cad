"""The layers the book teaches, one concept per module, and the registry that plugs them into the model.

* :mod:`.base`: the interfaces, :class:`FeedForward` and :class:`SelfAttention`;
* :mod:`.dense`: :class:`DenseFF`, the Transformer's FF layer (chapter 1);
* :mod:`.sparse_ff`: :class:`SparseFF` and its controllers (chapters 2, 3, 5);
* :mod:`.moe`: :class:`MoEFF`, a mixture of experts; :mod:`.pkm`: :class:`ProductKeyMemory` (chapter 6);
* :mod:`.attention`: the key/value cache, the causal attention step, dense attention;
* :mod:`.qkv`: the sparse QKV layers, multiplicative and convolutional (chapter 4);
* :mod:`.lsh`: :class:`LSHSelfAttention`, Reformer-style hashed attention (chapter 7);
* :mod:`.registry`: the kinds ``ModelConfig.ff`` and ``ModelConfig.qkv`` choose from.

No module here imports the model; each layer takes plain arguments and works on its own.
"""
from .attention import CausalSelfAttention, LayerCache, cached_attention
from .base import FeedForward, SelfAttention
from .dense import DenseFF
from .lsh import LSHSelfAttention
from .moe import MoEFF
from .pkm import ProductKeyMemory
from .qkv import ConvQKVAttention, ModuleConv, MultiplicativeAttention, MultiplicativeDense, resolve_qkv_modules
from .registry import FF_KINDS, QKV_KINDS, make_attention, make_ff
from .sparse_ff import FullRankController, LowRankController, MLPController, SparseFF, make_controller

__all__ = [
    "FeedForward", "SelfAttention", "DenseFF", "SparseFF", "MoEFF", "ProductKeyMemory", "LowRankController", "FullRankController",
    "MLPController", "make_controller", "LayerCache", "cached_attention", "CausalSelfAttention",
    "MultiplicativeDense", "ModuleConv", "MultiplicativeAttention", "ConvQKVAttention", "resolve_qkv_modules",
    "LSHSelfAttention",
    "FF_KINDS", "QKV_KINDS", "make_ff", "make_attention",
]
