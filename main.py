"""Train the reference CNN with optimization insight switched on.

    python main.py --dataset cifar10 --data-dir DIR --epochs 10
    python main.py --dataset fashion-mnist --epochs 3 --log-dir runs/fm
    python main.py --log-dir runs/fm --epochs 6 --resume

A user error (bad flag or value, missing or corrupt data) prints one line and
exits with status 2.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from config import parse_args  # noqa: E402
from data_loader import load_dataset, make_datasets  # noqa: E402


def build_model(input_shape, num_classes=10, activation="relu"):
    """The reference CNN of the seed experiment, as an InsightModel (`activation` of
    its hidden layers: ReLU as in the seed)."""
    import keras

    import optinsight as oi

    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(32, 3, activation=activation, name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(64, 3, activation=activation, name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Conv2D(64, 3, activation=activation, name="conv3")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(64, activation=activation, name="dense1")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="output")(x)
    return oi.InsightModel(inputs=inputs, outputs=outputs, name="reference_cnn")


def build_probes(every="epoch"):
    """The probe set of the main job: curvature, tangent kernel, weights, gradients,
    representations; each runs on the held-out probe batch."""
    from optinsight import probes

    return [
        probes.HessianProbe(every=every, k=2, trace_samples=10, density=True,
                            density_steps=16, density_samples=2),
        probes.NTKProbe(every=every, n=128),
        probes.WeightNormProbe(every=every),
        probes.WeightSpectrumProbe(every=every),
        probes.GradientNoiseProbe(every=every),
        probes.RepresentationProbe(every=every),
        probes.AugmentationProbe(every=every, n=8),
        probes.NeuralCollapseProbe(every=every),
        probes.ActivationProbe(every=20),
    ]


def distribution_strategy(name):
    """The tf.distribute strategy for --strategy (the default one for "none")."""
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def start_tensorflow(strategy_name, verbose=False):
    """Import TensorFlow, make the --strategy strategy (MultiWorkerMirroredStrategy must
    exist before TensorFlow runs any op) and start the runtime; TensorFlow's start-up
    lines are hidden unless `verbose`. Returns the strategy."""
    from optinsight.quiet import start_up_lines_hidden

    with start_up_lines_hidden(not verbose):
        import tensorflow as tf

        strategy = distribution_strategy(strategy_name)
        tf.zeros(())  # the runtime starts here (and probes for CUDA)
    return strategy


def probe_batch(dataset, n):
    """The first n examples of a batched (x, y) dataset, as numpy arrays."""
    x, y = next(iter(dataset.unbatch().batch(n)))
    return x.numpy(), y.numpy()


def run(config):
    """Train as `config` says; returns the final logs dict and the log dir (None on a
    worker that writes no logs)."""
    strategy = start_tensorflow(config.train.strategy, config.train.verbose)  # first
    import keras

    import optinsight as oi
    from optinsight.recorder import is_chief

    (x_train, y_train), _ = load_dataset(config.data.dataset, config.data.data_dir)
    if config.data.limit:
        x_train, y_train = x_train[: config.data.limit], y_train[: config.data.limit]
    keras.utils.set_random_seed(config.train.seed)
    train_ds, val_ds = make_datasets(x_train, y_train, config.data.batch_size,
                                     config.data.validation_split, seed=config.train.seed)
    log_dir = config.train.run_dir(config.data.dataset)
    if is_chief(strategy):
        print(f"{config.data.dataset}: {len(x_train)} examples of shape {x_train.shape[1:]}")
    with strategy.scope():
        model = build_model(x_train.shape[1:])
        optimizer = keras.optimizers.Adam(config.train.lr)
    probe_kwargs = {}
    if config.insight.probes:
        probe_kwargs = {"probes": build_probes(),
                        "probe_data": probe_batch(val_ds or train_ds,
                                                  config.insight.probe_examples)}
    options = {"resume": config.train.resume, "checkpoint_freq": config.train.checkpoint_every,
               "verbose": 1, **probe_kwargs, **config.insight.callback_kwargs()}
    with strategy.scope():  # the custom loop uses the loss for its probes only
        model.compile(
            optimizer=optimizer, loss="categorical_crossentropy",
            metrics=["accuracy", keras.metrics.F1Score(average="macro", name="macro_f1")])
    if config.train.strategy == "multiworker":
        options["instruments"] = None  # per-example gradients of one replica's batch only
        recorder = oi.InsightRecorder(log_dir, model, optimizer, **options)
        final = custom_loop(strategy, model, recorder, train_ds, val_ds, config)
        return final, log_dir if is_chief(strategy) else None
    history = model.fit(train_ds, validation_data=val_ds, epochs=config.train.epochs,
                        callbacks=[oi.OptimizationInsightCallback(log_dir, **options)],
                        shuffle=False,  # the pipeline shuffles
                        verbose=1 if sys.stdout.isatty() else 2)
    final = {k: v[-1] for k, v in history.history.items() if v}
    return final, log_dir


def custom_loop(strategy, model, recorder, train_ds, val_ds, config):
    """Train `model` under `strategy` with a custom loop recorded by `recorder` (what
    Keras's fit cannot do under MultiWorkerMirroredStrategy). Each replica's loss is
    its examples' summed cross-entropy over the global batch's size, so the summed
    gradients are those of the global batch's mean. Returns the last epoch's logs."""
    import keras
    import tensorflow as tf

    from optinsight.recorder import is_chief

    def replica_losses(x, y, training):
        y_pred = model(x, training=training)
        per_example = keras.losses.categorical_crossentropy(y, y_pred)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(y_pred, -1), tf.argmax(y, -1)),
                                        tf.float32))
        return per_example, correct

    def totals(per_replica):
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, t, axis=None)
                for t in per_replica]

    @tf.function
    def train_step(x, y):
        def step(x, y):
            global_batch = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, tf.cast(tf.shape(x)[0], tf.float32))
            with tf.GradientTape() as tape:
                per_example, correct = replica_losses(x, y, True)
                loss = tf.reduce_sum(per_example) / global_batch
            grads = tape.gradient(loss, model.trainable_variables)
            recorder.apply_gradients(zip(grads, model.trainable_variables), loss=loss)
            return tf.reduce_sum(per_example), correct, tf.cast(tf.shape(x)[0], tf.float32)
        return totals(strategy.run(step, args=(x, y)))

    @tf.function
    def eval_step(x, y):
        def step(x, y):
            per_example, correct = replica_losses(x, y, False)
            return tf.reduce_sum(per_example), correct, tf.cast(tf.shape(x)[0], tf.float32)
        return totals(strategy.run(step, args=(x, y)))

    def run_epoch(dataset, step_fn, on_batch=None):
        loss = correct = count = 0.0
        for x, y in strategy.experimental_distribute_dataset(dataset):
            batch_loss, batch_correct, batch_count = (float(t) for t in step_fn(x, y))
            loss, correct, count = loss + batch_loss, correct + batch_correct, count + batch_count
            if on_batch is not None:
                on_batch()
        return loss / max(count, 1), correct / max(count, 1)

    chief = is_chief(strategy)
    logs = {}
    with recorder:
        for epoch in range(recorder.initial_epoch, config.train.epochs):
            start = time.monotonic()
            logs = dict(zip(("loss", "accuracy"),
                            run_epoch(train_ds, train_step, recorder.batch_end)))
            if val_ds is not None:
                logs.update(zip(("val_loss", "val_accuracy"), run_epoch(val_ds, eval_step)))
            recorder.epoch_end(epoch, logs)
            if chief:
                seconds = time.monotonic() - start
                print(f"epoch {epoch + 1}/{config.train.epochs} ({seconds:.0f} s): "
                      + ", ".join(f"{k}={v:.4f}" for k, v in logs.items()), flush=True)
    return logs


def main(argv=None):
    """Entry point; returns the process exit status (0 ok, 2 user error)."""
    try:
        config = parse_args(argv)
        final, log_dir = run(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if final:
        print("final: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(final.items())))
    else:
        print("final: no epoch left to train (the run already reached --epochs)")
    if log_dir is None:
        return 0
    print(f"logs: {os.path.abspath(log_dir)}")
    print(f"  tensorboard --logdir {os.path.join(log_dir, 'tensorboard')}")
    print(f"  optinsight summary {log_dir}")
    print(f"  optinsight diagnose {log_dir}")
    print(f"  optinsight report {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
