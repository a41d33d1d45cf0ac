"""``hybrid-jax inspect``: what a recipe will cost, per parameter, before any training.

For a model config and a recipe, :func:`inspect_run` builds the run abstractly (the train state's
arrays are ``jax.ShapeDtypeStruct`` s from :func:`jax.eval_shape`: nothing is allocated or
trained, so a GPT-2 sized model inspects on a laptop), tabulates each parameter's precision plan
and optimizer group with the bytes it and its optimizer state hold, and compiles the train step
once to read XLA's memory analysis, whose temporaries are the activations and scratch of a step.
The totals are the bytes of the arrays the ``TrainState`` would hold.
"""

from __future__ import annotations

import dataclasses
import html
import warnings

import jax
import numpy as np

from hybrid_jax import tree as tree_lib
from hybrid_jax._table import Table, format_bytes
from hybrid_jax.app.config import RunConfig, load_precision, optimizer_groups
from hybrid_jax.app.run import build
from hybrid_jax.diagnostics import audit as audit_dots
from hybrid_jax.diagnostics import expected_from_plan
from hybrid_jax.precision import dtypes, plan, policies_with_paths
from hybrid_jax.train import state_bytes


@dataclasses.dataclass(frozen=True)
class Inspection:
    """What :func:`inspect_run` found.

    Attributes:
      table: one row per parameter (path, shape, param and compute dtype, optimizer group,
        parameter bytes, optimizer-state bytes), a line per group and a total.
      memory: :func:`~hybrid_jax.train.state_bytes` of the state (params, opt_state, other,
        total, num_params, bytes_per_param).
      step_memory: XLA's memory analysis of the compiled step: ``argument_bytes``,
        ``output_bytes``, ``alias_bytes`` (outputs written into donated inputs) and
        ``temp_bytes`` (activations and scratch).
      audit: with ``audit=True``, the dots of the compiled step and their dtypes against the
        plan (:func:`~hybrid_jax.diagnostics.audit`).
    """

    table: Table
    memory: dict[str, float]
    step_memory: dict[str, int | None]
    audit: Table | None = None

    def lines(self) -> list[str]:
        """The two summary lines under the table: the train state's bytes, and the compiled
        step's memory."""
        m, s = self.memory, self.step_memory
        mb = lambda n: "-" if n is None else format_bytes(n)
        return [
            f"train state: {format_bytes(m['total'])} for {m['num_params']:,} parameters "
            f"({m['bytes_per_param']:.2f} bytes each): params {format_bytes(m['params'])}, "
            f"optimizer {format_bytes(m['opt_state'])}, other {format_bytes(m['other'])}",
            f"compiled step (XLA memory analysis): arguments {mb(s['argument_bytes'])}, "
            f"outputs {mb(s['output_bytes'])} ({mb(s['alias_bytes'])} in donated inputs), "
            f"temporaries {mb(s['temp_bytes'])} (activations and scratch)",
        ]

    def __str__(self) -> str:
        audit = [] if self.audit is None else ["", _AUDIT_TITLE, str(self.audit)]
        return "\n".join([str(self.table), *self.lines(), *audit])

    def _repr_html_(self) -> str:
        lines = "".join(f"<p>{html.escape(line)}</p>" for line in self.lines())
        audit = (
            "" if self.audit is None else f"<p><b>{_AUDIT_TITLE}</b></p>{self.audit._repr_html_()}"
        )
        return self.table._repr_html_() + lines + audit


_AUDIT_TITLE = "precision audit of the compiled step"


def inspect_run(config: RunConfig, *, audit: bool = False) -> Inspection:
    """The precision plan, optimizer groups and memory of ``config``'s run, before training.

    Args:
      config: the run's settings (model shape, precision, optimizer, batch).
      audit: also list the dots of the compiled step with their operand and result dtypes,
        flagging those that differ from what the plan asked for.

    Returns:
      An :class:`Inspection`; ``str()`` of it is what ``hybrid-jax inspect`` prints.

    Examples:
      >>> config = RunConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, batch_size=2)
      >>> found = inspect_run(config)
      >>> found.memory["bytes_per_param"] == found.memory["total"] / found.memory["num_params"]
      True
    """
    run = build(config, abstract=True)
    state = run.state
    params = state.params
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tree_lib.UnusedRuleWarning)
        policies = plan(params, load_precision(config.precision))
    flat_policies = [policy for _, policy in policies_with_paths(policies)]
    flat_groups = jax.tree_util.tree_leaves(optimizer_groups(config, params))
    leaves, _ = tree_lib.leaves_with_paths(params)

    # Moments are charged to their parameter; step counters belong to none (they are in the
    # total's optimizer bytes, not in any row).
    state_of = {path: 0 for path, _ in leaves}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        owner = tree_lib.owner(tree_lib.path_str(keypath), state_of)
        if owner is not None:
            state_of[owner] += tree_lib.nbytes(leaf)

    rows, groups = [], {}
    for (path, leaf), policy, group in zip(leaves, flat_policies, flat_groups, strict=True):
        shape = tuple(np.shape(leaf))
        param_bytes = tree_lib.nbytes(leaf)  # an Int8Weight: its codes and scales
        row = (
            path,
            shape,
            dtypes.short_name(policy.param_dtype),
            dtypes.short_name(policy.compute_dtype),
            group,
            format_bytes(param_bytes),
            format_bytes(state_of[path]),
        )
        rows.append(row)
        n, p_bytes, s_bytes = groups.get(group, (0, 0, 0))
        groups[group] = (n + 1, p_bytes + param_bytes, s_bytes + state_of[path])
    footer = [
        (group, "", "", "", f"{n} leaves", format_bytes(p), format_bytes(s))
        for group, (n, p, s) in sorted(groups.items())
    ]
    memory = state_bytes(state)
    footer.append(
        (
            "total",
            "",
            "",
            "",
            f"{len(leaves)} leaves",
            format_bytes(memory["params"]),
            format_bytes(memory["opt_state"]),
        )
    )
    columns = ("path", "shape", "param", "compute", "optimizer", "param bytes", "state bytes")
    table = Table(columns, tuple(rows), tuple(footer))

    batch = run.sample_train(jax.random.fold_in(run.data_key, 0))
    compiled = run.step.lower(state, batch).compile()
    analysis = compiled.memory_analysis()
    step_memory = {
        key: getattr(analysis, f"{key[:-6]}_size_in_bytes", None)
        for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")
    }
    found = audit_dots(compiled, expected_from_plan(policies)) if audit else None
    return Inspection(table, memory, step_memory, found)
