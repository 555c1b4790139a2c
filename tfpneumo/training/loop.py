"""The training loop: the same code on one device, on several GPUs (MirroredStrategy) and on
several machines (MultiWorkerMirroredStrategy).

Keras 3's ``fit`` does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585: it
reduces scalar logs with ``axis=0``), so training goes through this loop, TensorFlow's own
answer (the ``multi_worker_with_ctl`` tutorial): ``strategy.run`` of the Trainer's
``train_step`` over a dataset from ``distribute_datasets_from_function``, compiled with
``tf.function``. Keras callbacks are still driven as ``fit`` drives them (progress bar,
TensorBoard, the run state), with the same logs.

Every number a callback sees is the same on every worker: the step returns the metrics read
in the cross-replica context, where Keras' metric variables (``on_read``, summed) are
all-reduced over every replica of every worker. Decisions taken from them (NaN stop) are
therefore taken by all workers at the same step, as collective ops require.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import warnings
from typing import NamedTuple

import numpy as np

from tfpneumo.tfimport import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402


def _train_function(trainer, strategy, jit_compile: bool, stop_flag):
    """One optimizer step over the next distributed batch -> (the metric logs of all replicas,
    whether any worker was asked to stop: ``stop_flag`` summed over the replicas)."""
    step = tf.function(trainer.train_step, reduce_retracing=True, jit_compile=jit_compile)

    @tf.function
    def train_one(iterator):
        strategy.run(step, args=(next(iterator),))
        asked = strategy.run(lambda: tf.identity(stop_flag))
        return trainer.get_metrics_result(), strategy.reduce("SUM", asked, axis=None)

    return train_one


def _test_function(trainer, strategy):
    """Every batch of a distributed dataset through ``test_step`` -> the metric logs.

    The loop runs inside the graph: its end is agreed by all replicas (the distributed
    iterator's ``get_next_as_optional``), so uneven last batches cannot leave one worker
    waiting in a collective."""
    step = tf.function(trainer.test_step, reduce_retracing=True)

    @tf.function
    def evaluate(dataset):
        for batch in dataset:
            strategy.run(step, args=(batch,))
        return trainer.get_metrics_result()

    return evaluate


def _floats(logs: dict) -> dict[str, float]:
    return {k: float(keras.ops.convert_to_numpy(v)) for k, v in logs.items()}


class Preempted(NamedTuple):
    """Where a SIGTERM stopped the loop: ``steps`` steps of epoch ``epoch`` (0-based) done."""

    epoch: int
    steps: int


@contextlib.contextmanager
def _sigterm_raises_flag(flag):
    """While inside: SIGTERM (a scheduler's preemption notice) sets ``flag`` instead of ending
    the process, so that the loop can stop at a step boundary and the run state be saved."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        flag.assign(1.0)
        print("tfpneumo: SIGTERM: stopping after this step to save the run state",
              file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fit(trainer, strategy, train_input, val_input=None, *, epochs: int, initial_epoch: int,
        steps_per_epoch: int, initial_step: int = 0, callbacks=(), verbose: int = 1,
        jit_compile: bool = False) -> Preempted | None:
    """Trains ``trainer`` (compiled, built) from epoch ``initial_epoch`` to ``epochs``.

    Args:
        train_input: ``InputContext -> dataset`` of per-replica training batches, infinite
            (already past ``initial_step`` steps when resuming inside an epoch).
        val_input: ``InputContext -> dataset`` of per-replica validation batches, finite;
            each worker evaluates its part of the fold (``InputContext.input_pipeline_id``)
            on its own replicas and the metric sums are all-reduced: every metric is a ratio
            of sums, so the figures are those of one device, and every worker reports them.
        initial_step: steps of ``initial_epoch`` already done (a run preempted mid-epoch).
        callbacks: Keras callbacks, driven as ``fit`` drives them; ``trainer.stop_training``
            ends the loop after the current step (and that epoch's validation).

    Returns:
        None when the epochs ran (or a callback stopped them); :class:`Preempted` when a
        SIGTERM reached any worker: every worker then stops after the same step, at once.
    """
    # Iterating a distributed dataset inside tf.function reads its options in graph mode.
    warnings.filterwarnings("ignore", message="To make it possible to preserve tf.data options")
    dist_train = strategy.distribute_datasets_from_function(train_input)
    dist_val = strategy.distribute_datasets_from_function(val_input) if val_input else None
    stop_flag = tf.Variable(0.0, trainable=False)  # this process's own; read by every replica
    train_one = _train_function(trainer, strategy, jit_compile, stop_flag)
    evaluate = _test_function(trainer, strategy)
    hooks = keras.callbacks.CallbackList(
        list(callbacks), add_history=True, add_progbar=verbose != 0, verbose=verbose,
        epochs=epochs, steps=steps_per_epoch, model=trainer)
    trainer.stop_training = False
    iterator = iter(dist_train)
    epoch_logs: dict[str, float] = {}
    with _sigterm_raises_flag(stop_flag):
        hooks.on_train_begin()
        for epoch in range(initial_epoch, epochs):
            trainer.reset_metrics()
            hooks.on_epoch_begin(epoch)
            logs = {}
            first = initial_step if epoch == initial_epoch else 0
            for step in range(first, steps_per_epoch):
                hooks.on_train_batch_begin(step)
                logs, asked = train_one(iterator)
                if float(asked) > 0:
                    return Preempted(epoch, step + 1)
                hooks.on_train_batch_end(step, logs)
                if trainer.stop_training:
                    break
            epoch_logs = _floats(trainer.get_metrics_result() if not logs else logs)
            if dist_val is not None:
                trainer.reset_metrics()
                epoch_logs.update({f"val_{k}": v for k, v in _floats(evaluate(dist_val)).items()})
            hooks.on_epoch_end(epoch, epoch_logs)
            if trainer.stop_training:
                break
        hooks.on_train_end(logs=epoch_logs)
    return None


# ----------------------------------------------------------------------------- the chief's state

def chief_values(strategy, workers: int, values) -> np.ndarray:
    """The chief's ``values`` (float64 numbers) on every worker; ``values`` as given when
    there is one worker. A collective: every worker calls it at the same point."""
    values = np.asarray(values, np.float64)
    if workers == 1:
        return values
    (shared,) = _broadcast(strategy, [tf.constant(values)])
    return shared


def share_chief_variables(strategy, workers: int, variables) -> None:
    """Assigns the chief's value of every variable on every worker (after the chief read a
    run state or weights file the others cannot see). One all-reduce per variable, in which
    every replica but the chief's first contributes zeros."""
    if workers == 1:
        return
    variables = list(variables)
    mine = [np.asarray(keras.ops.convert_to_numpy(v)) for v in variables]
    # float64 for all: one packed all-reduce takes one dtype, and it holds every float32
    # and every integer counter below 2**53 exactly
    values = _broadcast(strategy, [tf.constant(a.astype(np.float64)) for a in mine])
    for var, own, value in zip(variables, mine, values, strict=True):
        var.assign(np.asarray(value).astype(own.dtype))


def _from_first_replica(values):
    ctx = tf.distribute.get_replica_context()
    first = tf.cast(tf.equal(ctx.replica_id_in_sync_group, 0), tf.float64)
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, [v * first for v in values])


_BROADCASTS: dict[int, object] = {}  # one compiled broadcast per strategy


def _broadcast(strategy, tensors: list) -> list[np.ndarray]:
    run = _BROADCASTS.get(id(strategy))
    if run is None:
        run = tf.function(lambda values: strategy.run(_from_first_replica, args=(values,)),
                          reduce_retracing=True)
        _BROADCASTS[id(strategy)] = run
    result = run(tensors)
    return [np.asarray(strategy.experimental_local_results(r)[0]) for r in result]
