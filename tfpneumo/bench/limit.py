"""The ``limit`` section: this machine's matrix-multiply peak and the network's FLOPs.

The peak is the best of a few large ``tf.linalg.matmul`` (float32, and bfloat16 where the CPU
runs it) and of a large 3x3 convolution: on this CPU oneDNN's convolutions run ~1.5-2x faster
than TensorFlow's matmul, so a matmul-only figure is no ceiling (the network beat it). The
FLOPs per image come from TensorFlow's own cost analysis of the traced graph
(``tf.compat.v1.profiler``'s ``float_operation`` count: 2 x multiply-adds for convolutions,
their gradients and matmuls), for a forward pass (inference) and for a forward + backward
pass of both heads' BCE (the train step; the optimizer's element-wise update is not counted).
The report divides the train and inference rows' FLOP/s of the same run by the peak
(:func:`tfpneumo.bench.report.limit_shares`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from tfpneumo.bench.harness import Context, Row, error_line, progress


def graph_flops(fn, *specs) -> int:
    """Float operations of one call of ``fn`` on tensors of ``specs`` (``tf.TensorSpec``),
    as TensorFlow's profiler counts them on the traced graph."""
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    graph = tf.function(fn).get_concrete_function(*specs).graph
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    return int(tf.compat.v1.profiler.profile(graph=graph, options=opts).total_float_ops)


def model_flops(net, size: int, batch: int = 1, train: bool = False) -> float:
    """FLOPs per image of ``net`` (outputs ``mask``, ``label``) at ``size`` px: forward only,
    or (``train``) forward + gradients of the BCE of both heads w.r.t. every trainable weight."""
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    x_spec = tf.TensorSpec((batch, size, size, net.inputs[0].shape[-1]), tf.float32)
    if not train:
        return graph_flops(lambda x: net(x, training=False), x_spec) / batch

    def step(x, mask, label):
        with tf.GradientTape() as tape:
            out = net(x, training=True)
            loss = (tf.reduce_mean(tf.keras.backend.binary_crossentropy(mask, out["mask"]))
                    + tf.reduce_mean(tf.keras.backend.binary_crossentropy(label, out["label"])))
        return tape.gradient(loss, net.trainable_weights)

    m_spec = tf.TensorSpec((batch, size, size, 1), tf.float32)
    l_spec = tf.TensorSpec((batch, 1), tf.float32)
    return graph_flops(step, x_spec, m_spec, l_spec) / batch


def matmul_peak(dtype: str, n: int = 2048, repeats: int = 5, per_timing: int = 3) -> float:
    """Best FLOP/s of ``per_timing`` chained ``n x n`` ``tf.linalg.matmul`` over ``repeats``."""
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    a = tf.random.normal((n, n), dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a) * 0.01, dtype)
    tf.linalg.matmul(a, b).numpy()  # warm
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [tf.linalg.matmul(a, b) for _ in range(per_timing)]
        for o in outs:
            o.numpy()
        best = max(best, 2.0 * n ** 3 * per_timing / (time.perf_counter() - t0))
    return best


def conv_peak(dtype: str, channels: int = 512, side: int = 128, kernel: int = 3,
              repeats: int = 3) -> float:
    """Best FLOP/s of a ``kernel x kernel`` convolution, ``channels`` in and out, on one
    ``side x side`` image: oneDNN's convolution kernels, which on this CPU beat
    ``tf.linalg.matmul`` (a network can then exceed a matmul-only "peak")."""
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    x = tf.cast(tf.random.normal((1, side, side, channels)), dtype)
    w = tf.cast(tf.random.normal((kernel, kernel, channels, channels)) * 0.01, dtype)
    tf.nn.conv2d(x, w, 1, "SAME").numpy()  # warm
    flops = 2.0 * kernel * kernel * side * side * channels * channels
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        tf.nn.conv2d(x, w, 1, "SAME").numpy()
        best = max(best, flops / (time.perf_counter() - t0))
    return best


def bench_limit(ctx: Context, *, n: int | None = None, repeats: int | None = None,
                train_sizes: Sequence[int] | None = None,
                infer_sizes: Sequence[int] | None = None,
                layouts: Sequence[str] = ("base", "reference")) -> dict:
    """The float32 / bfloat16 matmul peak and the FLOPs per train and inference image of the
    base network (and the reference layout's, as the train section times it)."""
    from tfpneumo.tfimport import quiet_tensorflow

    quiet_tensorflow()
    import keras

    from tfpneumo.bench.synthetic import REFERENCE_OVERRIDES, base_model_config
    from tfpneumo.config import load_config
    from tfpneumo.models.unet import build_model

    n = n or 2048
    repeats = repeats or (3 if ctx.quick else 10)
    peak: dict = {}
    parts: dict = {}
    for dtype in ("float32", "bfloat16"):
        try:
            parts[dtype] = {"matmul": matmul_peak(dtype, n, repeats),
                            "conv3x3": conv_peak(dtype, repeats=repeats)}
            peak[dtype] = max(parts[dtype].values())
            progress(f"limit: {dtype} peak {peak[dtype] / 1e9:.0f} GFLOP/s (matmul "
                     f"{parts[dtype]['matmul'] / 1e9:.0f}, 3x3 conv "
                     f"{parts[dtype]['conv3x3'] / 1e9:.0f})")
        except Exception as e:  # bfloat16 is not on every CPU build
            peak[dtype] = {"error": error_line(e)}
    keras.mixed_precision.set_global_policy("float32")
    train_flops: dict = {}
    infer_flops: dict = {}
    for layout in layouts:
        cfg = load_config(None, REFERENCE_OVERRIDES if layout == "reference" else [])
        keras.utils.set_random_seed(0)
        net = build_model(base_model_config(cfg))
        for size in train_sizes or ((256,) if ctx.quick else (256, 512)):
            train_flops[f"{layout}/{size}"] = model_flops(net, size, train=True)
        if layout == "base":  # inference times the base network
            for size in infer_sizes or (256, 1024):
                infer_flops[str(size)] = model_flops(net, size)
    progress("limit: " + ", ".join(f"train {k} {v / 1e9:.1f} GFLOP/img"
                                   for k, v in train_flops.items()))
    return {"matmul_n": n, "peak_flop_s": peak, "peak_parts": parts, "train_flops_per_image": train_flops,
            "infer_flops_per_image": infer_flops}


def rows_limit(result: dict) -> list[Row]:
    out = []
    for dtype, p in result["peak_flop_s"].items():
        if isinstance(p, dict):
            out.append(Row(f"{dtype} peak", "failed", p["error"]))
        else:
            part = result.get("peak_parts", {}).get(dtype, {})
            out.append(Row(f"{dtype} peak", f"{p / 1e9:.0f} GFLOP/s",
                           f"best of tf.linalg.matmul n={result['matmul_n']} "
                           f"({part.get('matmul', 0) / 1e9:.0f}) and a 3x3 512->512 conv at 128 px "
                           f"({part.get('conv3x3', 0) / 1e9:.0f})"))
    for key, f in result["train_flops_per_image"].items():
        layout, size = key.split("/")
        out.append(Row(f"train FLOPs/image, {size} px, {layout} layout", f"{f / 1e9:.1f} GFLOP",
                       "TF profiler on the traced forward + backward (BCE, both heads)"))
    for size, f in result["infer_flops_per_image"].items():
        out.append(Row(f"inference FLOPs/image, {size} px (one forward)", f"{f / 1e9:.1f} GFLOP",
                       "TF profiler on the traced forward; hflip TTA doubles it"))
    return out
