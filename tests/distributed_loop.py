"""A custom training loop with InsightRecorder under a tf.distribute strategy, run as
a script by test_distribute.py (TensorFlow must see TF_CONFIG, or the logical devices,
before it starts).

    python distributed_loop.py STRATEGY LOG_DIR

STRATEGY: "multiworker" (TF_CONFIG names the cluster and this worker), "mirrored"
(two logical CPU devices; also fits the same model with the callback into
LOG_DIR/fit) or "single" (one device: the reference). Each worker's replicas take
halves of the same global batches of GLOBAL_BATCH examples. Prints "ok" at the end.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

GLOBAL_BATCH = 16
EXAMPLES = 128


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(EXAMPLES, 6)).astype("float32")
    x[:, 0] *= 1e-6
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, EXAMPLES)]
    return x, y


def build():
    import keras

    keras.utils.set_random_seed(0)
    x_in = keras.Input((6,))
    dead_two = keras.initializers.Constant([-3.0] * 2 + [0.1] * 6)
    h = keras.layers.Dense(8, activation="relu", name="h", bias_initializer=dead_two)(x_in)
    return keras.Model(x_in, keras.layers.Dense(3, activation="softmax", name="out")(h))


def optimizer():
    import keras

    return keras.optimizers.SGD(0.1, momentum=0.9)


def custom_loop(strategy, log_dir, epochs=2):
    import keras

    import optinsight as oi

    x, y = data()
    with strategy.scope():
        model = build()
        opt = optimizer()
    rec = oi.InsightRecorder(log_dir, model, opt, histogram_freq=4,
                             probes=[oi.probes.WeightNormProbe()], probe_data=(x[:32], y[:32]))

    def dataset(context):
        """This input pipeline's share of each global batch: with n pipelines, rows
        [i·b, (i+1)·b) of every global batch, b = GLOBAL_BATCH / n."""
        per_replica = context.get_per_replica_batch_size(GLOBAL_BATCH)
        share = GLOBAL_BATCH // context.num_input_pipelines
        rows = np.concatenate([np.arange(start, start + share) + context.input_pipeline_id
                               * share for start in range(0, EXAMPLES, GLOBAL_BATCH)])
        return tf.data.Dataset.from_tensor_slices((x[rows], y[rows])).batch(per_replica)

    @tf.function
    def train_step(batch):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                per_example = keras.losses.categorical_crossentropy(yb, model(xb, training=True))
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
            grads = tape.gradient(loss, model.trainable_variables)
            rec.apply_gradients(zip(grads, model.trainable_variables), loss=loss)
            return loss

        losses = strategy.run(replica_step, args=batch)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    with rec:
        for epoch in range(rec.initial_epoch, epochs):
            losses = []
            for batch in strategy.distribute_datasets_from_function(dataset):
                losses.append(float(train_step(batch)))
                rec.batch_end()
            rec.epoch_end(epoch, {"loss": float(np.mean(losses))})
    return model


def fit_with_callback(strategy, log_dir, epochs=2):
    import optinsight as oi

    x, y = data()
    with strategy.scope():
        model = build()
        model.compile(optimizer=optimizer(), loss="categorical_crossentropy")
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[oi.OptimizationInsightCallback(
                  log_dir, histogram_freq=4, probes=[oi.probes.WeightNormProbe()],
                  probe_data=(x[:32], y[:32]))])


def main(kind, log_dir):
    if kind == "multiworker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        assert strategy.num_replicas_in_sync == 2
        custom_loop(strategy, log_dir)
    elif kind == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        custom_loop(strategy, os.path.join(log_dir, "loop"))
        fit_with_callback(strategy, os.path.join(log_dir, "fit"))
    else:
        custom_loop(tf.distribute.get_strategy(), log_dir)
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
