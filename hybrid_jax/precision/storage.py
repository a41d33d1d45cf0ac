"""Int8 storage for frozen weights: one byte per value plus an fp32 scale per output channel.

A parameter whose policy stores it in int8 (``"p=int8,c=bf16"``) becomes an
:class:`Int8Weight` when cast to its param dtype: symmetric int8 codes with one scale per index
of the last axis (the output channel of a ``[in, out]`` kernel). It is frozen: the train step
gives it no gradient and the optimizer keeps no state for it. Casting to the compute dtype
dequantizes it, inside the jitted step, so only the int8 copy lives in memory between steps.
That is the QLoRA pattern (Dettmers et al. 2023): a frozen base in 8 bits (QLoRA uses 4) plus
small trainable parts in bf16.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax import tree as tree_lib
from hybrid_jax.precision import dtypes
from hybrid_jax.precision.quantize import quantize_int8_channels


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight(tree_lib.CompoundLeaf):
    """A frozen weight stored as int8 codes with one fp32 scale per output channel.

    ``value ≈ codes / scale``. Paths and rules see it as one leaf (its codes and scale are one
    parameter); :attr:`dtype` is int8, so floating-point casts and checks pass it by.

    Attributes:
      codes: int8 values in ``[-127, 127]``, the weight's shape.
      scale: fp32, ``127 / amax`` of each output channel (each index of the last axis), shaped
        to broadcast against ``codes``; one scale in all for 0-d and 1-d weights.

    Examples:
      >>> w = Int8Weight.quantize(jnp.array([[0.5, -0.01], [0.25, 0.02]]))
      >>> w.codes
      Array([[127, -64],
             [ 64, 127]], dtype=int8)
      >>> w.dequantize(jnp.float32)
      Array([[ 0.5       , -0.01007874],
             [ 0.2519685 ,  0.02      ]], dtype=float32)
      >>> w.nbytes  # 4 codes + 2 fp32 scales
      12
    """

    codes: jax.Array
    scale: jax.Array

    @classmethod
    def quantize(cls, x: jax.Array) -> Int8Weight:
        """Rounds ``x`` to int8 (half to even) with a per-output-channel symmetric scale.

        Raises:
          TypeError: ``x`` is not a floating-point array.
        """
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"int8 storage quantizes floating arrays, got {x.dtype}")
        axes = range(x.ndim - 1) if x.ndim >= 2 else range(x.ndim)
        return cls(*quantize_int8_channels(x, axes))

    def dequantize(self, dtype=jnp.bfloat16) -> jax.Array:
        """``codes / scale`` in ``dtype``, computed in fp32."""
        return (self.codes.astype(dtypes.FLOAT32) / self.scale).astype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def dtype(self) -> np.dtype:
        return dtypes.INT8

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the codes and the scales together."""
        return self.size + int(np.prod(np.shape(self.scale), dtype=np.int64)) * 4
