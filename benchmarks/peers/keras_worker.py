"""tf.keras (Keras 2, the study's framework) worker: the study's models, Adam, batch B.

    python keras_worker.py --model=xray_light --k=5 --size=128 --batch=64
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from worker_protocol import parse_args, serve  # noqa: E402


class LightConv2D(keras.layers.Layer):
    """The reference LightConv2D: conv(x, w1) + b1 -> relu -> conv(., w2) + b2 (stride 1, SAME)."""

    def __init__(self, filters, kernel_size, k, **kw):
        super().__init__(**kw)
        self.filters, self.kernel_size, self.k = filters, kernel_size, k

    def build(self, shape):
        kh = kw = self.kernel_size
        reg = keras.regularizers.l2(1e-4)
        self.w1 = self.add_weight("w1", (kh, kw, shape[-1], self.k), initializer="glorot_uniform", regularizer=reg)
        self.b1 = self.add_weight("b1", (self.k,), initializer="glorot_uniform")
        self.w2 = self.add_weight("w2", (kh, kw, self.k, self.filters), initializer="glorot_uniform",
                                  regularizer=reg)
        self.b2 = self.add_weight("b2", (self.filters,), initializer="glorot_uniform")

    def call(self, x):
        y = tf.nn.relu(tf.nn.conv2d(x, self.w1, 1, "SAME") + self.b1)
        return tf.nn.conv2d(y, self.w2, 1, "SAME") + self.b2


def xray_light(size, k):
    L = keras.layers
    x = inp = keras.Input((size, size, 3))
    for f in (8, 16, 32):
        a = L.BatchNormalization()(LightConv2D(f, 3, k)(x))
        a = L.ReLU()(a)
        a = L.BatchNormalization()(LightConv2D(f, 3, k)(a))
        s = L.BatchNormalization()(LightConv2D(f, 1, k)(x))
        x = L.MaxPooling2D()(L.ReLU()(L.Add()([a, s])))
    out = L.Dense(2)(L.GlobalAveragePooling2D()(x))
    return keras.Model(inp, out)


def xray_conv2d(size):
    L = keras.layers
    x = inp = keras.Input((size, size, 3))
    for f in (8, 16, 32):
        for _ in range(3):
            x = L.BatchNormalization()(L.Conv2D(f, 3, activation="relu")(x))
        x = L.MaxPooling2D()(x)
    out = L.Dense(2)(L.GlobalAveragePooling2D()(x))
    return keras.Model(inp, out)


def onednn_state():
    """'oneDNN on' or 'oneDNN off': whether this TensorFlow runs its oneDNN kernels. TF enables them by
    default only on some CPUs (e.g. with AVX-512 VNNI/BF16); TF_ENABLE_ONEDNN_OPTS=1/0 forces it."""
    from tensorflow.python.util import _pywrap_util_port  # TF's own switch, as its startup log reads it

    return "oneDNN on" if _pywrap_util_port.IsMklEnabled() else "oneDNN off"


def main():
    a = parse_args()

    def build():
        model = xray_light(a.size, a.k) if a.model == "xray_light" else xray_conv2d(a.size)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        rng = np.random.default_rng(0)
        x = tf.constant(rng.uniform(size=(a.batch, a.size, a.size, 3)).astype(np.float32))
        y = tf.constant(rng.integers(0, 2, size=(a.batch,)))

        def step():
            model.train_on_batch(x, y)  # returns host floats: synchronised

        total = int(sum(np.prod(w.shape) for w in model.weights))
        trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
        return step, {"framework": f"tf.keras {tf.__version__}, {onednn_state()}", "total_params": total,
                      "trainable_params": trainable}

    serve(build)


if __name__ == "__main__":
    main()
