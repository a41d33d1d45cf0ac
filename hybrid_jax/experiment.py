"""The main job: train the bundled GPT on a character corpus under a precision/optimizer recipe.

``hybrid-jax train`` is :func:`train` with flags; the benchmarks call it once per recipe. The
defaults are nanoGPT's CPU "baby GPT" run (4 layers, 4 heads, 128 channels, context 64, batch 12,
2000 iterations, lr 1e-3 cosine to 1e-4 after 100 warm-up steps, no dropout), with bf16-mixed
precision, Muon on the hidden matrices and AdamW on the rest, and ``lm`` + ``z_loss`` terms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from hybrid_jax import data as data_lib
from hybrid_jax.losses import Weighted, cross_entropy, z_loss
from hybrid_jax.mixing import EMA
from hybrid_jax.models import GPT, Fp8Meta, GPTConfig, quantize_matmuls
from hybrid_jax.models.matmuls import FP8_SCALINGS
from hybrid_jax.optim import group_labels, muon_adamw, muon_adamw_rules, with_precision
from hybrid_jax.precision import DynamicLossScale, NoOpLossScale, Policy, PrecisionRules
from hybrid_jax.train import Checkpointer, TrainState, evaluate, make_eval_step, make_train_step
from hybrid_jax.train.guard import NonFiniteError, SkipGuard
from hybrid_jax.train.sharding import (
    batch_parts,
    batch_sharding,
    make_mesh,
    parse_mesh,
    replicated,
    shard_state,
)

OPTIMIZERS = ("muon_adamw", "adamw")
LOSS_SCALES = ("auto", "dynamic", "none")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run's result; saved with its checkpoints and summary."""

    precision: str = "bf16-mixed"
    optimizer: str = "muon_adamw"
    steps: int = 2000
    batch_size: int = 12
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-4
    muon_lr: float = 1e-2
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    z_loss_weight: float = 1e-4
    data: str | None = None
    seed: int = 1337
    eval_interval: int = 250
    eval_batches: int = 25
    eval_batch_size: int = 64
    sample_chars: int = 300
    fp8_scaling: str = "current"
    loss_scale: str = "auto"
    ema_decay: float = 0.0
    eval_ema: bool = False
    mesh: str | None = None
    max_skips: int = 20

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")
        if self.eval_ema and not self.ema_decay:
            raise ValueError("eval_ema needs an EMA of the parameters: set ema_decay, e.g. 0.999")
        if self.loss_scale not in LOSS_SCALES:
            raise ValueError(f"unknown loss_scale {self.loss_scale!r}; choose from {LOSS_SCALES}")
        if self.mesh is not None:
            parse_mesh(self.mesh)
        if self.fp8_scaling not in FP8_SCALINGS:
            raise ValueError(
                f"unknown fp8_scaling {self.fp8_scaling!r}; choose from {FP8_SCALINGS}"
            )
        for name in (
            "steps",
            "batch_size",
            "block_size",
            "n_layer",
            "n_head",
            "n_embd",
            "eval_interval",
            "eval_batches",
            "eval_batch_size",
            "max_skips",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def load_precision(spec: str) -> Policy | PrecisionRules:
    """A preset or policy string, the path of a JSON rules file, or the JSON itself.

    Rules in JSON are ``{"rules": [[pattern, policy], ...], "default": policy}`` (``default``
    optional), e.g. ``{"rules": [["embed|ln_", "fp32"]], "default": "bf16-mixed"}``.
    """
    inline = spec.lstrip().startswith("{")
    if inline or os.path.isfile(spec):
        where = "inline precision rules" if inline else f"precision rules file {spec!r}"
        try:
            if inline:
                raw = json.loads(spec)
            else:
                with open(spec, encoding="utf-8") as f:
                    raw = json.load(f)
            return PrecisionRules([tuple(r) for r in raw["rules"]], default=raw.get("default"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from e
    return Policy.parse(spec)


def _uses_fp16(precision: Policy | PrecisionRules) -> bool:
    if isinstance(precision, Policy):
        policies = [precision]
    else:
        default = [precision.default] if precision.default else []
        policies = [*(r.value for r in precision.rules), *default]
    return any(p.compute_dtype == jnp.float16 for p in policies)


def build_optimizer(
    config: RunConfig, precision: Policy | PrecisionRules | None = None
) -> optax.GradientTransformation:
    """Gradient clipping, then AdamW (nanoGPT's recipe) or Muon + AdamW, on a cosine schedule;
    with ``precision``, :func:`~hybrid_jax.optim.with_precision` applies its policies' optimizer
    keys (master, grad, mu, nu, update) leaf by leaf."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        config.lr,
        config.warmup_steps,
        max(config.steps, config.warmup_steps + 1),
        config.min_lr,
    )
    if config.optimizer == "adamw":
        # nanoGPT decays only the matrices (dim >= 2), never gains or biases.
        decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
        inner = optax.adamw(
            schedule, b1=0.9, b2=0.99, weight_decay=config.weight_decay, mask=decay_mask
        )
    else:
        # Muon follows the same warm-up and cosine, scaled to its own peak.
        muon_schedule = lambda step: schedule(step) * (config.muon_lr / config.lr)
        inner = muon_adamw(
            schedule, muon_learning_rate=muon_schedule, weight_decay=config.weight_decay
        )
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), inner)
    # A policy without optimizer keys leaves the transformation as it is.
    return tx if precision is None else with_precision(tx, precision, seed=config.seed)


def optimizer_groups(config: RunConfig, params: Any) -> Any:
    """A tree like ``params`` naming the optimizer group :func:`build_optimizer` gives each leaf."""
    if config.optimizer == "adamw":
        return jax.tree_util.tree_map(
            lambda p: "adamw" if p.ndim >= 2 else "adamw (no decay)", params
        )
    rules = muon_adamw_rules()
    # muon_adamw_rules' order: embeddings and head, gains and biases, hidden matrices.
    patterns = [pattern for pattern, _ in rules]
    names = dict(zip(patterns, ("adamw", "adam (no decay)", "muon"), strict=True))
    return jax.tree_util.tree_map(names.get, group_labels(rules, params))


def terms_of_logits(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
    """The run's loss terms: next-token cross-entropy ``lm`` and ``z_loss``."""
    return {"lm": cross_entropy(logits, targets), "z_loss": z_loss(logits)}


@dataclasses.dataclass
class Run:
    """What :func:`build` sets up: the model, data, state and jitted functions of a run."""

    config: RunConfig
    tokenizer: data_lib.CharTokenizer
    graphdef: Any
    state: TrainState
    step: Callable
    eval_step: Callable
    sample_train: Callable
    val_set: Any
    data_key: jax.Array
    loss_terms: Callable
    precision: Any
    weighting: Weighted
    optimizer: optax.GradientTransformation
    mesh: Mesh | None = None


def build(config: RunConfig) -> Run:
    """Builds everything a run needs, without running it.

    With ``config.mesh`` (e.g. ``"data=4,fsdp=2"``) the state is sharded over a device mesh
    (:mod:`hybrid_jax.train.sharding`), batches are sampled straight into their shards and the
    step runs data-parallel and FSDP; across processes too, after
    :func:`~hybrid_jax.train.sharding.initialize_distributed`.
    """
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
    # On the device once: batches are then sampled there, and the host never builds one. With a
    # mesh, every device holds the (small) corpus and samples its own share of each batch.
    to_device = jnp.asarray if mesh is None else lambda x: jax.device_put(x, replicated(mesh))
    train_tokens, val_tokens = to_device(dataset.train), to_device(dataset.val)
    model = GPT(
        GPTConfig(
            vocab_size=tokenizer.vocab_size,
            block_size=config.block_size,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_embd=config.n_embd,
        ),
        rngs=nnx.Rngs(config.seed),
    )
    precision = load_precision(config.precision)
    # fp8/int8 compute reaches the matmuls; the cast plan leaves those weights to them.
    cast_plan = quantize_matmuls(model, precision, fp8_scaling=config.fp8_scaling)
    graphdef, params, no_fp8_meta = nnx.split(model, nnx.Param, Fp8Meta)

    def loss_terms(compute_params, batch, rng, fp8_meta=no_fp8_meta):
        del rng  # no dropout
        logits = nnx.merge(graphdef, compute_params, fp8_meta)(batch[0])
        return terms_of_logits(logits, batch[1])

    weighting = Weighted({"lm": 1.0, "z_loss": config.z_loss_weight})
    dynamic = config.loss_scale == "dynamic" or (
        config.loss_scale == "auto" and _uses_fp16(precision)
    )
    loss_scale = DynamicLossScale(2.0**15) if dynamic else NoOpLossScale()
    tx = build_optimizer(config, precision)
    # An fp32 average, whatever the params' dtype: a bf16 one would round its small steps away.
    ema = EMA(config.ema_decay, warmup_steps=10, dtype=jnp.float32) if config.ema_decay else None
    state = TrainState.create(
        params,
        tx,
        loss_scale=loss_scale,
        rng=config.seed,
        precision=cast_plan,
        weighting=weighting,
        fp8_meta=no_fp8_meta,
        ema=ema,
    )
    if mesh is not None:
        state = shard_state(state, mesh)
    batch_size, block_size = config.batch_size, config.block_size
    sample = lambda key: data_lib.sample_batch(train_tokens, key, batch_size, block_size)
    return Run(
        config=config,
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
        sample_train=jax.jit(sample)
        if mesh is None
        else jax.jit(sample, out_shardings=batch_sharding(mesh)),
        val_set=data_lib.eval_batches(
            val_tokens, config.eval_batches, config.eval_batch_size, block_size, seed=config.seed
        ),
        data_key=jax.random.key_data(jax.random.key(config.seed + 1)),
        loss_terms=loss_terms,
        precision=cast_plan,
        weighting=weighting,
        optimizer=tx,
        mesh=mesh,
    )


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


@contextlib.contextmanager
def _interrupt_flag() -> Iterator[dict]:
    """Turns Ctrl-C into a flag the loop checks between steps, so a save is never cut short."""
    flag = {"stop": False}
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        del signum, frame
        flag["stop"] = True

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C alone
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _to_host(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train(
    config: RunConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    diagnose: bool = False,
) -> dict[str, Any]:
    """Trains, evaluates, checkpoints and samples; returns (and writes) the run's summary.

    Writes into ``out``: ``metrics.jsonl`` (one JSON object per logged step and evaluation),
    ``checkpoints/`` (orbax, every ``eval_interval`` steps, at the end and on Ctrl-C) and
    ``summary.json``. The host reads step ``t - 1``'s metrics only after dispatching step ``t``,
    so it never stalls the device.

    Args:
      config: the run's settings.
      out: the output folder (created if missing).
      resume: continue from the latest checkpoint in ``out`` (its settings must match).
      progress: show a progress bar with the loss and tokens/s.
      log: where lines of text go (the last one is the final validation loss).
      diagnose: after training, write the numerics diagnostics of the final state (parameters,
        gradients, activations, update stagnation; :func:`hybrid_jax.diagnose.diagnose`) to
        ``diagnostics.txt`` in ``out`` and print them.

    Returns:
      The summary: ``final_val_loss``, ``wall_time_s``, ``steps``, ``tokens_per_s``, ...
    """
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    run = build(config)
    # Every process runs the same steps; the first one alone writes files and prints.
    main = jax.process_index() == 0
    if not main:
        progress, log = False, lambda text: None
    eval_params = lambda state: state.ema_params if config.eval_ema else state.params
    state = run.state
    settings = dataclasses.asdict(config)
    start_time = time.perf_counter()
    # What a resumed run carries over from the checkpoint's metadata.
    carried = {"wall_time_s": 0.0, "skipped_steps": 0, "first_step_val_loss_le_1.88": None}
    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(Checkpointer(os.path.join(out, "checkpoints")))
        if resume:
            state, meta = _restore(ckpt, state, settings)
            carried.update({k: meta[k] for k in carried if k in meta})
            log(f"resumed from step {int(state.step)} in {ckpt.directory}")
        first = int(jax.device_get(state.step))
        metrics_path = os.path.join(out, "metrics.jsonl") if main else os.devnull
        metrics_file = stack.enter_context(
            open(metrics_path, "a" if resume else "w", encoding="utf-8")
        )
        interrupt = stack.enter_context(_interrupt_flag())
        bar = stack.enter_context(_Progress(progress, first, config.steps, log))

        def record(entry: dict[str, Any]) -> None:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()

        def read(metrics: dict[str, jax.Array], step: int) -> dict[str, float]:
            host = _to_host(metrics)
            carried["skipped_steps"] += int(host["skipped"])
            record({"step": step, **host})
            return host

        def save() -> None:
            if ckpt.has(int(jax.device_get(state.step))):
                return  # the final save right after a periodic one
            wall = carried["wall_time_s"] + time.perf_counter() - start_time
            ckpt.save(state, meta={"settings": settings, **carried, "wall_time_s": wall})

        tokens_per_step = config.batch_size * config.block_size
        val_loss, timer = float("nan"), _Throughput(tokens_per_step)
        guard = SkipGuard(config.max_skips, min_loss_scale=_floor(state.loss_scale))

        def check(metrics: dict[str, jax.Array], t: int) -> TrainState | None:
            """Reads step ``t``'s metrics; after too many skips, the state to go on from."""
            host = read(metrics, t + 1)
            bar.update(t + 1, host["loss"], timer.rate())
            try:
                reason = guard.observe(t, host)
            except NonFiniteError as e:
                raise NonFiniteError(f"{e}; {_nonfinite_leaves(run, state, t)}") from None
            if reason is None:
                return None
            start = guard.start_of_trouble()
            good = [step for step in ckpt.all_steps() if step <= start]
            if not good:
                raise NonFiniteError(
                    f"{reason}, and there is no checkpoint from before step {start} to roll back "
                    f"to; {_nonfinite_leaves(run, state, t)}"
                )
            ckpt.discard_after(max(good))  # the abandoned path's checkpoints
            restored, _ = ckpt.restore(state, step=max(good))
            guard.rolled_back(max(good))
            record({"step": t + 1, "rollback_to": max(good), "reason": reason})
            bar.note(f"{reason}: rolled back to the checkpoint of step {max(good)}")
            return restored

        pending, t = None, first
        while True:
            if t < config.steps:
                batch = run.sample_train(jax.random.fold_in(run.data_key, t))
                state, metrics = run.step(state, batch)
            if pending is not None:  # the previous step's metrics, read after this dispatch
                restored = check(*pending)
                if restored is not None:
                    state, pending, t = restored, None, int(jax.device_get(restored.step))
                    continue
            if t >= config.steps:
                break
            pending = (metrics, t)
            if t == first + 1:  # compilation is left out of the throughput
                jax.block_until_ready(state)
                timer.start()
            timer.count()
            done = t + 1
            if done % config.eval_interval == 0 or done == config.steps:
                with timer.paused():
                    val_loss = evaluate(
                        run.eval_step, eval_params(state), run.val_set, state.fp8_meta
                    )["lm"]
                record({"step": done, "val_loss": val_loss})
                bar.note(f"step {done}: val loss {val_loss:.4f}")
                if carried["first_step_val_loss_le_1.88"] is None and val_loss <= 1.88:
                    carried["first_step_val_loss_le_1.88"] = done
                save()
            if interrupt["stop"]:
                save()
                ckpt.wait()
                log(
                    f"interrupted at step {done}: checkpoint saved in {ckpt.directory}; run "
                    "again with --resume to continue"
                )
                raise KeyboardInterrupt
            t += 1
        jax.block_until_ready(state)
        tokens_per_s = timer.rate()
        if first >= config.steps:  # nothing left to train: evaluate what was restored
            val_loss = evaluate(run.eval_step, eval_params(state), run.val_set, state.fp8_meta)[
                "lm"
            ]
        save()

    wall = carried["wall_time_s"] + time.perf_counter() - start_time
    skipped = carried["skipped_steps"]
    sample = generate(
        run, eval_params(state), config.sample_chars, seed=config.seed, fp8_meta=state.fp8_meta
    )
    summary = {
        "final_val_loss": val_loss,
        "wall_time_s": wall,
        "steps": config.steps,
        "tokens_per_s": tokens_per_s,
        "skipped_steps": skipped,
        "first_step_val_loss_le_1.88": carried["first_step_val_loss_le_1.88"],
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "settings": settings,
    }
    if main:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    if diagnose:
        from hybrid_jax.diagnose import diagnose as diagnose_state

        batch = run.sample_train(jax.random.fold_in(run.data_key, config.steps))
        report = str(diagnose_state(run, state, batch))
        with open(os.path.join(out, "diagnostics.txt"), "w", encoding="utf-8") as f:
            f.write(report + "\n")
        log(report)
    log("---- sample ----")
    log(sample)
    log("----------------")
    log(f"wall time {wall:.1f} s, {tokens_per_s:,.0f} tokens/s, {skipped} skipped steps")
    log(f"final val loss {val_loss:.4f}")
    return summary


def _floor(loss_scale: Any) -> float | None:
    """The loss scale's floor, if it backs off (``DynamicLossScale``)."""
    if isinstance(loss_scale, DynamicLossScale):
        return float(jax.device_get(loss_scale.min_loss_scale))
    return None


def _nonfinite_leaves(run: Run, state: TrainState, t: int) -> str:
    """Which gradients of step ``t``'s batch are not finite, recomputed from ``state`` (whose
    parameters a skipped step left as they were) at its loss scale, for an error message."""
    from hybrid_jax.diagnose import diagnose

    batch = run.sample_train(jax.random.fold_in(run.data_key, t))
    grads = diagnose(run, state, batch).gradients
    bad = [p for p, n in zip(grads.column("path"), grads.column("nonfinite"), strict=True) if n]
    if not bad:
        return (
            f"step {t}'s gradients are finite (at loss scale "
            f"{float(jax.device_get(state.loss_scale.loss_scale)):g}), so the update or the "
            "optimizer state was not: a parameter or moment overflowing its dtype (fp16?)"
        )
    shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
    return f"non-finite gradients at step {t} in {shown}"


def _restore(ckpt: Checkpointer, like: TrainState, settings: dict) -> tuple[TrainState, dict]:
    """The latest checkpoint, after checking it was trained with these settings."""
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt.directory}")
    meta = ckpt.meta()  # settings first: their message says more than a shape mismatch
    # A run may go on for more steps, on another mesh (the restore reshards it), or with
    # another patience for skipped steps.
    free = ("steps", "mesh", "max_skips")
    saved = {k: v for k, v in meta.get("settings", {}).items() if k not in free}
    mine = {k: v for k, v in settings.items() if k not in free}
    if saved != mine:
        changed = ", ".join(
            f"{k}={saved.get(k)!r}" for k in sorted(mine) if saved.get(k) != mine[k]
        )
        raise ValueError(
            f"--resume: the checkpoint in {ckpt.directory} was trained with other settings "
            f"({changed})"
        )
    return ckpt.restore(like)


class _Throughput:
    """Training tokens per second, with evaluation time left out."""

    def __init__(self, tokens_per_step: int):
        self._tokens_per_step = tokens_per_step
        self._since, self._steps, self._paused_s = None, 0, 0.0

    def start(self) -> None:
        self._since, self._steps, self._paused_s = time.perf_counter(), 0, 0.0

    def count(self) -> None:
        self._steps += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self._paused_s += time.perf_counter() - start

    def rate(self) -> float:
        if self._since is None or self._steps < 2:
            return float("nan")
        elapsed = time.perf_counter() - self._since - self._paused_s
        return (self._steps - 1) * self._tokens_per_step / elapsed


class _Progress:
    """A rich progress bar showing the loss and tokens/s; without it, notes go to ``log``."""

    def __init__(self, enabled: bool, first: int, total: int, log: Callable[[str], None]):
        self._bar, self._log = None, log
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self._task = self._bar.add_task("train", total=total, completed=first, info="")

    def __enter__(self):
        if self._bar:
            self._bar.start()
        return self

    def __exit__(self, *exc):
        if self._bar:
            self._bar.stop()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self._bar:
            self._bar.update(
                self._task, completed=step, info=f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s"
            )

    def note(self, text: str) -> None:
        if self._bar:
            self._bar.console.print(text)
        else:
            self._log(text)
