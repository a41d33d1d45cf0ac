"""A run built and ready: the model, data, state and jitted functions of a configuration.

``hybrid-jax train`` builds one with :func:`build` and trains it (:mod:`hybrid_jax.app.loop`);
``bench``, ``inspect``, ``mix`` and the tests build runs too, without training them.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from hybrid_jax import data as data_lib
from hybrid_jax.app.config import RunConfig, build_optimizer, load_precision
from hybrid_jax.losses import Weighted, lm_terms
from hybrid_jax.mixing import EMA
from hybrid_jax.models import GPT, Fp8Meta, GPTConfig, quantize_matmuls
from hybrid_jax.precision import DynamicLossScale, NoOpLossScale, computes_in
from hybrid_jax.train import (
    TrainState,
    batch_parts,
    batch_sharding,
    make_eval_step,
    make_mesh,
    make_train_step,
    replicated,
    shard_state,
)


@dataclasses.dataclass(frozen=True)
class Run:
    """What :func:`build` sets up: the model, data, state and jitted functions of a run.

    Attributes:
      config: the settings it was built from, with ``precision="auto"`` resolved.
      precision_reason: why the precision is what it is (``"as given"`` unless it was auto).
      tokenizer: the corpus' character tokenizer (``None`` for token files without a
        vocabulary in their meta: the run then trains and evaluates, but prints no sample).
      graphdef: the GPT's ``nnx.GraphDef``; ``nnx.merge(graphdef, params, fp8_meta)`` rebuilds it.
      state: the initial :class:`~hybrid_jax.train.TrainState` (sharded when there is a mesh).
      step: the jitted train step ``(state, batch) -> (state, metrics)``; donates ``state``.
      eval_step: the jitted ``(params, batch, fp8_meta) -> {term: loss}``.
      sample_train: ``key -> (tokens, targets)``, a training batch on the device (sampled
        there from a text corpus, read on the host from token files).
      val_set: the fixed validation batches, stacked on a leading axis.
      data_key: the key that step ``t``'s batch is folded from.
      loss_terms: ``(compute_params, batch, rng, fp8_meta) -> {"lm": ..., "z_loss": ...}``.
      precision: the cast plan (the precision with fp8/int8 weights left to their matmuls).
      weighting: how the loss terms add up.
      optimizer: the optimizer the state was created with.
      mesh: the device mesh, or ``None`` on one device.
      host_batch: for token files, ``key -> (tokens, targets)`` as NumPy arrays read from the
        memmap (what :meth:`train_batches` prefetches); ``None`` when batches are sampled on the
        device.
    """

    config: RunConfig
    precision_reason: str
    tokenizer: data_lib.CharTokenizer | None
    graphdef: nnx.GraphDef
    state: TrainState
    step: Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]
    eval_step: Callable[..., dict[str, jax.Array]]
    sample_train: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
    val_set: tuple[jax.Array, jax.Array]
    data_key: jax.Array
    loss_terms: Callable[..., dict[str, jax.Array]]
    precision: Any
    weighting: Weighted
    optimizer: optax.GradientTransformation
    mesh: Mesh | None = None
    host_batch: Callable[[jax.Array], tuple[np.ndarray, np.ndarray]] | None = None

    def train_batches(self, first: int) -> Iterator[Any]:
        """The batches of steps ``first, first + 1, ...``: step ``t``'s comes from
        ``fold_in(data_key, t)``, so a resumed run sees the batches of an uninterrupted one.

        From token files a background thread reads them on the host and keeps
        :data:`PREFETCH` of them ready on the device (:func:`~hybrid_jax.data.prefetch`);
        ``close()`` the iterator to stop it. From a text corpus they are sampled on the device
        as each step asks, asynchronously already.
        """
        keys = (jax.random.fold_in(self.data_key, t) for t in itertools.count(first))
        if self.host_batch is None:
            return (self.sample_train(key) for key in keys)
        placement = None if self.mesh is None else batch_sharding(self.mesh)
        return data_lib.prefetch(map(self.host_batch, keys), PREFETCH, placement)


#: Batches read ahead from token files: two hide one slow read behind a step.
PREFETCH = 2


def build(config: RunConfig, *, abstract: bool = False) -> Run:
    """Builds everything a run needs, without running it.

    With ``abstract=True`` the parameters and the train state are ``jax.ShapeDtypeStruct``
    trees (:func:`jax.eval_shape`), never allocated: enough to count their bytes and to lower
    and compile the step (``run.step.lower(run.state, batch)``) for a model that would not fit.

    With ``config.mesh`` (e.g. ``"data=4,fsdp=2"``) the state is sharded over a device mesh
    (:mod:`hybrid_jax.train.sharding`), batches are sampled straight into their shards and the
    step runs data-parallel and FSDP; across processes too, after
    :func:`~hybrid_jax.train.sharding.initialize_distributed`.
    """
    config, precision_reason = config.resolved()
    mesh = None if config.mesh is None else make_mesh(config.mesh)
    if mesh is not None:
        parts = batch_parts(mesh)
        if config.batch_size % parts:
            raise ValueError(
                f"batch size {config.batch_size} cannot be split over mesh {config.mesh!r} "
                f"({parts} data x fsdp devices); use a batch size that is a multiple of "
                f"{parts}, or a mesh with fewer data/fsdp devices"
            )
    dataset = data_lib.load_dataset(config.data, block_size=config.block_size)
    tokenizer = dataset.tokenizer
    vocab_size = config.vocab_size or dataset.vocab_size
    if vocab_size < dataset.vocab_size:
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the data's vocabulary "
            f"({dataset.vocab_size} token ids in {dataset.source})"
        )
    gpt_config = GPTConfig(
        vocab_size=vocab_size,
        block_size=config.block_size,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        attention=config.attention,
    )
    new_model = lambda: GPT(gpt_config, rngs=nnx.Rngs(config.seed))
    model = nnx.eval_shape(new_model) if abstract else new_model()
    precision = load_precision(config.precision)
    # fp8/int8 compute reaches the matmuls; the cast plan leaves those weights to them.
    cast_plan = quantize_matmuls(model, precision, fp8_scaling=config.fp8_scaling)
    graphdef, params, no_fp8_meta = nnx.split(model, nnx.Param, Fp8Meta)

    def loss_terms(compute_params, batch, rng, fp8_meta=no_fp8_meta):
        del rng  # no dropout
        logits = nnx.merge(graphdef, compute_params, fp8_meta)(batch[0])
        return lm_terms(logits, batch[1])

    weighting = Weighted({"lm": 1.0, "z_loss": config.z_loss_weight})
    dynamic = config.loss_scale == "dynamic" or (
        config.loss_scale == "auto" and computes_in(cast_plan, jnp.float16)
    )
    loss_scale = DynamicLossScale(2.0**15) if dynamic else NoOpLossScale()
    tx = build_optimizer(config, precision)
    # An fp32 average, whatever the params' dtype: a bf16 one would round its small steps away.
    ema = EMA(config.ema_decay, warmup_steps=10, dtype=jnp.float32) if config.ema_decay else None
    create_state = lambda params: TrainState.create(
        params,
        tx,
        loss_scale=loss_scale,
        rng=config.seed,
        precision=cast_plan,
        weighting=weighting,
        fp8_meta=no_fp8_meta,
        ema=ema,
    )
    state = jax.eval_shape(create_state, params) if abstract else create_state(params)
    if mesh is not None and not abstract:
        state = shard_state(state, mesh)
    sample_train, val_set, host_batch = _batches(config, dataset, mesh)
    return Run(
        config=config,
        precision_reason=precision_reason,
        tokenizer=tokenizer,
        graphdef=graphdef,
        state=state,
        step=make_train_step(
            loss_terms,
            optimizer=tx,
            weighting=weighting,
            precision=cast_plan,
            loss_scale=loss_scale,
            ema=ema,
            mesh=mesh,
        ),
        eval_step=make_eval_step(loss_terms, precision=cast_plan),
        sample_train=sample_train,
        val_set=val_set,
        data_key=jax.random.key_data(jax.random.key(config.seed + 1)),
        loss_terms=loss_terms,
        precision=cast_plan,
        weighting=weighting,
        optimizer=tx,
        mesh=mesh,
        host_batch=host_batch,
    )


def _batches(config: RunConfig, dataset: Any, mesh: Mesh | None) -> tuple[Any, Any, Any]:
    """``(sample_train, val_set, host_batch)`` of a text corpus (sampled on the device) or of
    token files (read on the host): the same batches for the same token ids and seed."""
    b, t = config.batch_size, config.block_size
    n, eval_b, seed = config.eval_batches, config.eval_batch_size, config.seed
    # With a mesh, every device holds the validation set (and a text corpus: it is small).
    place = jnp.asarray if mesh is None else lambda x: jax.device_put(x, replicated(mesh))
    if isinstance(dataset, data_lib.TokenDataset):
        if jax.process_count() > 1:
            raise ValueError(
                f"token files ({dataset.source}) train in one process for now: every process "
                "would feed the whole batch; use a text corpus, or one process with a mesh"
            )
        host_batch = lambda key: data_lib.sample_batch_host(dataset.train, key, b, t)
        placement = None if mesh is None else batch_sharding(mesh)
        sample_train = lambda key: jax.device_put(host_batch(key), placement)
        val_set = data_lib.eval_batches_host(dataset.val, n, eval_b, t, seed=seed)
        return sample_train, jax.tree_util.tree_map(place, val_set), host_batch
    # On the device once: batches are then sampled there, and the host never builds one; with a
    # mesh, every device samples its own share of each batch.
    train_tokens, val_tokens = place(dataset.train), place(dataset.val)
    sample = lambda key: data_lib.sample_batch(train_tokens, key, b, t)
    sample_train = (
        jax.jit(sample) if mesh is None else jax.jit(sample, out_shardings=batch_sharding(mesh))
    )
    val_set = data_lib.eval_batches(val_tokens, n, eval_b, t, seed=seed)
    return sample_train, val_set, None


def generate(
    run: Run,
    params: Any,
    n_chars: int,
    *,
    fp8_meta: Any = None,
    seed: int = 0,
    temperature: float = 0.8,
    prompt: str | None = None,
) -> str:
    """Samples ``n_chars`` characters after ``prompt`` (one jitted loop on device).

    The default prompt is a newline, as nanoGPT's ``sample.py``, or the first character of the
    vocabulary when the text has no newline.
    """
    block = run.config.block_size
    if prompt is None:
        prompt = "\n" if "\n" in run.tokenizer.chars else run.tokenizer.chars[0]
    ids = run.tokenizer.encode(prompt)[-block:]
    model_state = (params,) if fp8_meta is None else (params, fp8_meta)

    @jax.jit
    def sample(model_state, key):
        model = nnx.merge(run.graphdef, *model_state)
        buf = jnp.zeros((block,), jnp.int32).at[: len(ids)].set(jnp.asarray(ids, jnp.int32))

        def body(i, carry):
            buf, out, key = carry
            pos = jnp.minimum(len(ids) - 1 + i, block - 1)  # causal: later slots are ignored
            logits = model(buf[None])[0, pos] / temperature
            key, sub = jax.random.split(key)
            token = jax.random.categorical(sub, logits).astype(jnp.int32)
            full = len(ids) + i >= block
            buf = jnp.where(
                full,
                jnp.roll(buf, -1).at[-1].set(token),
                buf.at[jnp.minimum(pos + 1, block - 1)].set(token),
            )
            return buf, out.at[i].set(token), key

        out = jnp.zeros((n_chars,), jnp.int32)
        _, out, _ = jax.lax.fori_loop(0, n_chars, body, (buf, out, key))
        return out

    tokens = sample(model_state, jax.random.key(seed))
    return run.tokenizer.decode(np.asarray(tokens))
