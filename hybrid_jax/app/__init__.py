"""The applications behind the ``hybrid-jax`` command: train, bench, inspect, diagnose, mix.

They sit on top of the library (:mod:`hybrid_jax.precision`, :mod:`hybrid_jax.optim`,
:mod:`hybrid_jax.train`, ...), and the library never imports them. A run is a
:class:`~hybrid_jax.app.config.RunConfig` (what decides its result), built by
:func:`~hybrid_jax.app.run.build` (model, data, state, jitted functions) and trained by
:func:`~hybrid_jax.app.loop.train` (step, evaluate, checkpoint, roll back, sample).

Nothing is imported here, so that ``hybrid-jax --help`` answers before Flax loads.
"""
