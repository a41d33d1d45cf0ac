"""A nanoGPT-equivalent GPT in Flax NNX, written to train fast on a small CPU.

The model is Karpathy's nanoGPT (``model.py``): learned position embeddings, pre-LayerNorm
blocks of causal self-attention and an MLP with the exact (erf) GELU, a final LayerNorm, and an
output head tied to the token embedding. Initialisation is nanoGPT's: ``normal(0, 0.02)`` for
linear and embedding weights, ``normal(0, 0.02 / sqrt(2 * n_layer))`` for the two residual
projections of each block, zero biases, unit LayerNorm scales. There is no dropout.

Parameter paths (``nnx.state(model, nnx.Param)``; the ``bias`` leaves only with ``bias=True``)::

  tok_embed/embedding                  pos_embed/embedding
  blocks/{i}/ln_1/scale, /bias         blocks/{i}/ln_2/scale, /bias
  blocks/{i}/attn/qkv/kernel, /bias    blocks/{i}/attn/proj/kernel, /bias
  blocks/{i}/mlp/fc/kernel, /bias      blocks/{i}/mlp/proj/kernel, /bias
  ln_f/scale, /bias                    lm_head/kernel (only with tie_embeddings=False)

Precision. The model computes in the dtype of its parameters: cast them to bf16
(``hybrid_jax.cast_to_compute(params, "bf16-mixed")``) and the matmuls run in bf16. The fp32
islands are explicit: LayerNorm statistics, the attention scores and softmax (fp32 in every
attention core, see :func:`resolve_attention`), and the logits, which are fp32 whatever the
parameters. Leaves may differ in dtype (per-leaf precision rules): the residual stream keeps the
token embedding's dtype, each linear layer computes in its kernel's dtype, and every change
between them is an explicit cast, so nothing upcasts silently (the tests run under strict dtype
promotion).

Speed. Activations stay 2-D (``B·T x C``) around every matmul, so a linear layer is one GEMM and
its gradient two GEMMs with no batch dimensions for XLA to transpose around; only attention sees
the heads, as batched GEMMs over ``B x H`` (or, on a CUDA GPU with bf16 or fp16 activations,
in cuDNN's flash attention: ``GPTConfig.attention``). GELU, LayerNorm and the attention core
state their derivatives in closed form (:mod:`hybrid_jax.models.ops`), which leaves XLA fewer
elementwise passes and fewer temporaries to allocate (XLA:CPU allocates them on every call; the
CLI's ``_keep_freed_memory`` explains what that costs). ``jax.checkpoint`` does not lower them:
XLA:CPU drops its optimisation barriers and merges the recomputation back into the forward pass.
``benchmarks/model_speed.py`` times all of this.

References:
  Karpathy, `nanoGPT <https://github.com/karpathy/nanoGPT>`_ (``model.py``); Radford et al.,
  2019, `Language Models are Unsupervised Multitask Learners` (GPT-2); Hendrycks and Gimpel,
  2016, `Gaussian Error Linear Units <https://arxiv.org/abs/1606.08415>`_.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.models.ops import causal_attention, gelu, layer_norm

DotGeneral = Callable[..., jax.Array]
"""The signature of :func:`jax.lax.dot_general`: ``(lhs, rhs, dimension_numbers) -> out``."""

ATTENTION = ("auto", "ops", "xla", "cudnn")
"""The names :attr:`GPTConfig.attention` accepts."""

_INIT_STD = 0.02
# x_NxI @ w_IxO: contract the last axis of x with the first of w.
_MATMUL = (((1,), (0,)), ((), ()))
# x_NxC @ e_VxC^T, for the tied output head: contract the last axes of both.
_MATMUL_T = (((1,), (1,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The shape of a :class:`GPT`. Defaults are nanoGPT's CPU "baby GPT" for Tiny Shakespeare.

    Attributes:
      vocab_size: number of token ids.
      block_size: the longest context (the number of learned positions).
      n_layer: transformer blocks.
      n_head: attention heads; must divide ``n_embd``.
      n_embd: channels of the residual stream.
      bias: biases in the linear layers and LayerNorms (nanoGPT's ``train.py`` default is
        ``False``; the output head never has one).
      tie_embeddings: the output head reuses the token embedding, as in nanoGPT.
      attention: the attention core, one of :data:`ATTENTION`. ``"ops"``:
        :func:`~hybrid_jax.models.ops.causal_attention`, heads transposed next to the batch,
        a closed-form backward pass. ``"xla"``: :func:`jax.nn.dot_product_attention` on
        ``[B, T, H, D]`` as JAX writes it, differentiated by autodiff (its bf16 gradient does
        not compile under ``jax_numpy_dtype_promotion="strict"`` in jax 0.10: a JAX issue).
        ``"cudnn"``: the same function running cuDNN's fused flash attention, which never
        stores the ``[T, T]`` probabilities (CUDA GPUs only, fp16 or bf16 activations).
        ``"auto"`` (the default) picks ``"cudnn"`` where cuDNN takes the inputs and ``"ops"``
        elsewhere, when the model is traced. :func:`resolve_attention` says which runs, why,
        and at what precision.

    Raises:
      ValueError: a size that is not a positive integer, ``n_head`` not dividing ``n_embd``, or
        an ``attention`` not in :data:`ATTENTION`.

    Examples:
      >>> config = GPTConfig(vocab_size=65)
      >>> config.n_layer, config.n_head, config.n_embd, config.block_size, config.bias
      (4, 4, 128, 64, False)
      >>> config.attention
      'auto'
    """

    vocab_size: int
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    bias: bool = False
    tie_embeddings: bool = True
    attention: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_head={self.n_head} must divide n_embd={self.n_embd} "
                "(each head gets n_embd // n_head channels)"
            )
        _check_attention(self.attention)


def resolve_attention(
    attention: str,
    dtype: jax.typing.DTypeLike,
    seq_len: int,
    head_size: int,
    backend: str | None = None,
) -> str:
    """The core :attr:`GPTConfig.attention` stands for: ``"ops"``, ``"xla"`` or ``"cudnn"``.

    ``"auto"`` is decided when the model is traced: ``"cudnn"`` where cuDNN's flash attention
    takes the inputs (a CUDA GPU of compute capability 8.0 or later, fp16 or bf16 activations,
    a head size that is a multiple of 8 up to 128, or 256 from compute capability 9.0: the
    limits JAX checks) and the sequence length is even; ``"ops"`` everywhere else. Odd lengths
    go to ``"ops"`` because JAX's cuDNN gradient refuses them (jax 0.10 and 0.11 take the
    placeholder for "no bias" for a bias, and cuDNN's backward pass with a bias needs even
    lengths); its forward pass takes them, but whether a gradient follows is not known here.

    On an H200, GPT-2 124M (context 1024, batch 16, bf16-mixed) trains 1.7x faster with cuDNN
    than with ``"ops"`` and needs 8.8 instead of 21.5 GiB of temporaries. ``"ops"`` was as fast
    as ``"xla"`` or faster, with less memory, in bf16 and fp32 on that GPU and on XLA:CPU: so it
    is the fallback, TPUs included.

    ``jax.nn.dot_product_attention``'s own default, ``implementation=None``, makes no such
    choice: in jax 0.10 (and 0.11) it runs the XLA implementation on every backend, its source
    leaving automatic selection as a to-do. cuDNN has to be named, and fails at trace time on
    inputs it does not take, hence the checks here.

    Softmax precision: ``"ops"`` and ``"xla"`` compute the scores into fp32 and take the
    softmax in fp32; cuDNN keeps the scores and the softmax statistics in fp32 inside its
    kernel. All three round the probabilities to the activations' dtype for the product with
    ``v``, so that bf16 activations give bf16 attention outputs.

    Args:
      attention: one of :data:`ATTENTION`.
      dtype: the dtype of ``q``, ``k`` and ``v`` (the ``qkv`` projection's output).
      seq_len: the sequence length ``T``.
      head_size: channels per head, ``n_embd // n_head``.
      backend: the platform, by default :func:`jax.default_backend`.

    Returns:
      The core that runs: ``attention`` itself, unless it is ``"auto"``.

    Raises:
      ValueError: ``attention`` is not in :data:`ATTENTION`, or it is ``"cudnn"`` where cuDNN's
        flash attention does not take the inputs.

    Examples:
      >>> resolve_attention("auto", jnp.bfloat16, 1024, 64, backend="cpu")
      'ops'
      >>> resolve_attention("xla", jnp.float32, 1024, 12)
      'xla'
    """
    _check_attention(attention)
    if attention not in ("auto", "cudnn"):
        return attention
    backend = backend or jax.default_backend()
    capability = _cuda_capability() if backend == "gpu" else None
    max_head = 256 if capability and capability >= (9, 0) else 128
    cudnn = (
        capability is not None
        and capability >= (8, 0)
        and jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16)
        and head_size % 8 == 0
        and head_size <= max_head
    )
    if attention == "auto" and seq_len % 2:
        return "ops"
    if attention == "cudnn" and not cudnn:
        raise ValueError(
            "GPTConfig.attention='cudnn' needs a CUDA GPU of compute capability 8.0 or later, "
            "fp16 or bf16 activations and a head size that is a multiple of 8 up to 128 (256 "
            f"from compute capability 9.0); got {jnp.dtype(dtype)} activations and head size "
            f"{head_size} on {backend} (compute capability {capability}). 'auto' uses cuDNN "
            "where it applies and 'ops' elsewhere."
        )
    return "cudnn" if cudnn else "ops"


def _check_attention(attention: str) -> None:
    if attention not in ATTENTION:
        raise ValueError(
            f"GPTConfig.attention must be one of {', '.join(map(repr, ATTENTION))}, "
            f"got {attention!r}"
        )


def _cuda_capability() -> tuple[int, int] | None:
    # A CUDA device reports "major.minor"; a ROCm one its gfx name; CPUs and TPUs nothing.
    capability = getattr(jax.devices()[0], "compute_capability", "")
    match = re.fullmatch(r"(\d+)\.(\d+)", str(capability))
    return (int(match[1]), int(match[2])) if match else None


def _scope(layer: nnx.Module):
    """``jax.named_scope`` of the layer's path, when its model gave it one."""
    scope = getattr(layer, "scope", None)
    return jax.named_scope(scope) if scope else contextlib.nullcontext()


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` on 2-D activations, through a replaceable ``dot_general``.

    Args:
      in_features, out_features: the kernel's shape.
      bias: whether there is a bias (initialised to zero).
      std: the standard deviation of the kernel's normal initialisation.
      dot_general: the matmul, :func:`jax.lax.dot_general` by default; the precision layer
        swaps in a quantized one (fp8, int8) here. Called as ``dot_general(x_NxI, kernel_IxO,
        (((1,), (0,)), ((), ())))``.
      rngs: its ``params`` stream initialises the kernel.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        std: float,
        dot_general: DotGeneral | None = None,
        rngs: nnx.Rngs,
    ):
        self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), std))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if bias else None
        self.dot_general = dot_general or jax.lax.dot_general

    def __call__(self, x_NxI: jax.Array) -> jax.Array:
        kernel_IxO = self.kernel[...]
        # The layer computes in its kernel's dtype; a no-op unless precision rules mix dtypes.
        with _scope(self):
            y_NxO = self.dot_general(x_NxI.astype(kernel_IxO.dtype), kernel_IxO, _MATMUL)
        if self.bias is not None:
            y_NxO = y_NxO + self.bias[...].astype(y_NxO.dtype)
        return y_NxO


class Embed(nnx.Module):
    """A table of ``num_embeddings`` vectors; :meth:`attend` is the tied output head."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dot_general: DotGeneral | None = None,
        rngs: nnx.Rngs,
    ):
        self.embedding = nnx.Param(_normal(rngs, (num_embeddings, features), _INIT_STD))
        # None: the table is only looked up, never a head, so it has no matmul to quantize.
        self.dot_general = dot_general

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x_NxC: jax.Array) -> jax.Array:
        """``x @ embedding.T``: a score per table row, in the embedding's dtype."""
        embedding_VxC = self.embedding[...]
        dot_general = self.dot_general or jax.lax.dot_general
        with _scope(self):
            return dot_general(x_NxC.astype(embedding_VxC.dtype), embedding_VxC, _MATMUL_T)


class LayerNorm(nnx.Module):
    """:func:`layer_norm` with a learned ``scale`` (ones) and optional ``bias`` (zeros)."""

    def __init__(self, features: int, *, bias: bool):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return layer_norm(x, self.scale[...], bias)


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention on ``B·T x C`` activations.

    Its ``attention`` attribute (:attr:`GPTConfig.attention`, settable per layer) names the
    core; :func:`resolve_attention` decides ``"auto"`` each time the layer is traced. The
    products of every core multiply activations by activations and never go through
    ``dot_general``.
    """

    def __init__(self, config: GPTConfig, *, dot_general: DotGeneral | None, rngs: nnx.Rngs):
        c = config.n_embd
        self.n_head = config.n_head
        self.attention = config.attention
        linear = functools.partial(Linear, bias=config.bias, dot_general=dot_general, rngs=rngs)
        self.qkv = linear(c, 3 * c, std=_INIT_STD)
        self.proj = linear(c, c, std=_residual_std(config))

    def __call__(self, x_NxC: jax.Array, batch: int) -> jax.Array:
        n, c = x_NxC.shape
        b, t, h = batch, n // batch, self.n_head
        d = c // h
        qkv_Nx3C = self.qkv(x_NxC)
        core = resolve_attention(self.attention, qkv_Nx3C.dtype, t, d)
        if core == "ops":
            # One transpose puts the heads next to the batch, so that both attention products
            # are plain batched GEMMs; on XLA:CPU measured faster than einsums on [B, T, H, D]
            # or jax.nn.dot_product_attention, which leave the transposes to XLA.
            qkv_3xBxHxTxD = qkv_Nx3C.reshape(b, t, 3, h, d).transpose(2, 0, 3, 1, 4)
            q_BxHxTxD, k_BxHxTxD, v_BxHxTxD = qkv_3xBxHxTxD
            q_BxHxTxD = q_BxHxTxD * jnp.asarray(1 / math.sqrt(d), q_BxHxTxD.dtype)
            y_BxHxTxD = causal_attention(q_BxHxTxD, k_BxHxTxD, v_BxHxTxD)
            y_BxTxHxD = y_BxHxTxD.transpose(0, 2, 1, 3)
        else:
            # jax.nn.dot_product_attention takes the [B, T, H, D] layout the projection gives,
            # so there is no transpose; it scales the fp32 scores itself.
            q_BxTxHxD, k_BxTxHxD, v_BxTxHxD = jnp.unstack(qkv_Nx3C.reshape(b, t, 3, h, d), axis=2)
            # Standard promotion inside JAX's own code: its XLA path names the scores' dtype
            # with jnp.promote_types(bf16, f32), which strict promotion refuses (jax 0.10).
            with jax.numpy_dtype_promotion("standard"):
                y_BxTxHxD = jax.nn.dot_product_attention(
                    q_BxTxHxD,
                    k_BxTxHxD,
                    v_BxTxHxD,
                    scale=1 / math.sqrt(d),
                    is_causal=True,
                    implementation=core,
                )
        return self.proj(y_BxTxHxD.reshape(n, c))


class FeedForward(nnx.Module):
    """The block's MLP, ``C -> 4C -> GELU -> C``, with nanoGPT's exact (erf) GELU."""

    def __init__(self, config: GPTConfig, *, dot_general: DotGeneral | None, rngs: nnx.Rngs):
        c = config.n_embd
        linear = functools.partial(Linear, bias=config.bias, dot_general=dot_general, rngs=rngs)
        self.fc = linear(c, 4 * c, std=_INIT_STD)
        self.proj = linear(4 * c, c, std=_residual_std(config))

    def __call__(self, x_NxC: jax.Array) -> jax.Array:
        return self.proj(gelu(self.fc(x_NxC)))


class Block(nnx.Module):
    """A pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig, *, dot_general: DotGeneral | None, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, dot_general=dot_general, rngs=rngs)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = FeedForward(config, dot_general=dot_general, rngs=rngs)

    def __call__(self, x_NxC: jax.Array, batch: int) -> jax.Array:
        # The residual stream keeps its dtype; a branch computed in another is cast back.
        x_NxC = x_NxC + self.attn(self.ln_1(x_NxC), batch).astype(x_NxC.dtype)
        return x_NxC + self.mlp(self.ln_2(x_NxC)).astype(x_NxC.dtype)


class GPT(nnx.Module):
    """nanoGPT's GPT: token ids ``[B, T]`` in, fp32 next-token logits ``[B, T, vocab]`` out.

    The module docstring lists the parameter paths and the precision rules.

    Args:
      config: the model's shape, a :class:`GPTConfig`.
      rngs: its ``params`` stream initialises the weights (``nnx.Rngs(0)``).
      dot_general: the matmul of every linear layer and of the output head, by default
        :func:`jax.lax.dot_general`: the hook through which the precision layer runs them in
        fp8 or int8. It is called as ``dot_general(x_NxI, kernel_IxO, (((1,), (0,)), ((), ())))``
        and, for the tied head, ``dot_general(x_NxC, embedding_VxC, (((1,), (1,)), ((), ())))``.
        The attention products multiply activations by activations and do not use it. A
        module's ``dot_general`` attribute can also be set after construction, per layer.

    Raises:
      TypeError: ``config`` is not a :class:`GPTConfig`.

    Examples:
      Split once, then merge inside a plain ``jax.jit`` over the pure parameters, as a train
      step does (calling ``model(tokens)`` directly works too, op by op).

      >>> from flax import nnx
      >>> config = GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=2, n_embd=8)
      >>> graphdef, params = nnx.split(GPT(config, rngs=nnx.Rngs(0)), nnx.Param)
      >>> forward = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens))
      >>> logits = forward(params, jnp.zeros((2, 8), jnp.int32))
      >>> logits.shape, logits.dtype
      ((2, 8, 8), dtype('float32'))

    References:
      Karpathy, `nanoGPT <https://github.com/karpathy/nanoGPT>`_, ``model.py``.
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, dot_general: DotGeneral | None = None):
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        tied = config.tie_embeddings
        head_dot = (dot_general or jax.lax.dot_general) if tied else None
        self.tok_embed = Embed(config.vocab_size, config.n_embd, dot_general=head_dot, rngs=rngs)
        self.pos_embed = Embed(config.block_size, config.n_embd, rngs=rngs)
        self.blocks = nnx.List(
            [Block(config, dot_general=dot_general, rngs=rngs) for _ in range(config.n_layer)]
        )
        self.ln_f = LayerNorm(config.n_embd, bias=config.bias)
        # nanoGPT's head never has a bias; tied, it is tok_embed.attend.
        head = functools.partial(Linear, bias=False, std=_INIT_STD, dot_general=dot_general)
        self.lm_head = None if tied else head(config.n_embd, config.vocab_size, rngs=rngs)
        # Each matmul runs under its layer's path as a name scope, so that the compiled HLO
        # says which layer a dot belongs to (op_name ".../blocks/0/mlp/fc/dot_general").
        for path, node in nnx.iter_graph(self):
            if isinstance(node, (Linear, Embed)):
                node.scope = "/".join(str(k) for k in path)

    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        """Next-token logits ``[B, T, vocab]`` in fp32 for token ids ``[B, T]``."""
        return self.from_embeddings(self.embed(tokens_BxT))

    def embed(self, tokens_BxT: jax.Array) -> jax.Array:
        """Token plus position embeddings ``[B, T, C]``, in the token embedding's dtype.

        An id outside ``[0, vocab_size)`` embeds as NaN (``jnp.take``'s fill mode), so a bad
        token shows up as a NaN loss instead of a silently clamped row.

        Raises:
          ValueError: ``tokens_BxT`` is not a 2-D integer array, or ``T > block_size``.
        """
        if tokens_BxT.ndim != 2 or not jnp.issubdtype(tokens_BxT.dtype, jnp.integer):
            raise ValueError(
                "tokens must be integer ids shaped [batch, time], got "
                f"{tokens_BxT.dtype}{list(tokens_BxT.shape)}"
            )
        t = tokens_BxT.shape[1]
        if t > self.config.block_size:
            raise ValueError(
                f"sequence length {t} exceeds the model's block_size {self.config.block_size}"
            )
        tok_BxTxC = self.tok_embed(tokens_BxT)
        pos_TxC = self.pos_embed.embedding[...][:t].astype(tok_BxTxC.dtype)
        return tok_BxTxC + pos_TxC

    def from_embeddings(self, x_BxTxC: jax.Array) -> jax.Array:
        """The blocks, final LayerNorm and head on embeddings ``[B, T, C]``: fp32 logits.

        :meth:`__call__` is ``from_embeddings(embed(tokens))``. This entry point takes any
        floating input, so a gradient with respect to the embeddings is one ``jax.grad`` away.
        """
        b, t, c = x_BxTxC.shape
        x_NxC = x_BxTxC.reshape(b * t, c)
        for block in self.blocks:
            x_NxC = block(x_NxC, b)
        x_NxC = self.ln_f(x_NxC)
        head = self.tok_embed.attend if self.lm_head is None else self.lm_head
        logits_NxV = head(x_NxC)
        return logits_NxV.astype(jnp.float32).reshape(b, t, -1)  # fp32 island: the logits


def _residual_std(config: GPTConfig) -> float:
    # GPT-2's scaled init: 2 * n_layer residual branches add up along the stream.
    return _INIT_STD / math.sqrt(2 * config.n_layer)
