"""The ``deepfault-jax`` command line.

Exit codes: 0 success; 2 bad input or usage (one line on stderr naming the
expected and the actual value, no traceback); 1 an internal error.
Every command takes ``--json``: one JSON object on stdout with the result;
progress bars and messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


class UsageError(ValueError):
    """Bad command-line usage (exit code 2); ``prog`` names the (sub)command."""

    def __init__(self, message: str, prog: str = "deepfault-jax"):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit code 2, raised not printed."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        raise UsageError(message, self.prog)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _emit(args: argparse.Namespace, result: dict, human: Sequence[str]) -> None:
    if args.json:
        json.dump(result, sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    else:
        for line in human:
            print(line)
    sys.stdout.flush()


def _check_out_dir(path: str) -> Path:
    """Fails early (before any long work) when ``path`` cannot hold an output directory."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out must be a directory path; got existing file {str(out)!r}")
    probe_at = out if out.is_dir() else out.parent
    try:
        probe_at.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=probe_at):
            pass
    except OSError as e:
        raise UsageError(
            f"--out must be a writable location; got {str(out)!r} ({e.strerror or e})"
        ) from None
    return out


def _slug(spec: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in spec)
    return keep.strip("-") or "data"


# --------------------------------------------------------------------------- commands


def _cmd_train(args: argparse.Namespace) -> int:
    import jax

    from deepfault_jax import data, zoo

    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1; got {args.epochs}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1; got {args.batch_size}")
    if not args.learning_rate > 0:
        raise UsageError(f"--learning-rate must be > 0; got {args.learning_rate}")
    out_arg = args.out or os.path.join(
        "runs", f"{args.model}-{_slug(args.dataset)}-seed{args.seed}"
    )
    out = _check_out_dir(out_arg)
    dataset = data.load_dataset(args.dataset)
    model = zoo.create_model(
        args.model,
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        activation=args.activation,
    )
    epochs = zoo.default_epochs(dataset) if args.epochs is None else args.epochs
    summary = dataset.summary()
    if not args.json:
        h, w, c = dataset.input_shape
        print(
            f"training {model.name} ({model.activation}) on {dataset.name}: "
            f"{summary['num_train']} train / {summary['num_test']} test images of {h}x{w}x{c}, "
            f"{dataset.num_classes} classes; {epochs} epochs, seed {args.seed}",
            flush=True,
        )
    result = zoo.train(
        jax.random.key(args.seed),
        model,
        dataset,
        epochs=epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        progress=not args.no_progress,
    )
    checkpoint = zoo.save_checkpoint(
        out,
        model,
        result.params,
        metadata={
            "dataset": dataset.name,
            "seed": args.seed,
            "epochs": epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "test_accuracy": result.test_accuracy,
        },
    )
    report = {
        "model": model.name,
        "activation": model.activation,
        "dataset": dataset.name,
        "seed": args.seed,
        "epochs": epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "num_train": summary["num_train"],
        "num_test": summary["num_test"],
        "input_shape": summary["input_shape"],
        "num_classes": summary["num_classes"],
        "test_accuracy": result.test_accuracy,
        "train_seconds": round(result.seconds, 3),
        "history": result.history,
        "checkpoint": str(checkpoint),
    }
    n_test = summary["num_test"]
    correct = round(result.test_accuracy * n_test)
    _emit(
        args,
        report,
        [
            f"test accuracy {result.test_accuracy:.4f} ({correct}/{n_test}) "
            f"after {epochs} epochs in {result.seconds:.1f} s",
            f"checkpoint {checkpoint}",
        ],
    )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import jax

    from deepfault_jax import data, zoo

    versions = zoo.package_versions()
    devices = [
        {"id": d.id, "platform": d.platform, "kind": d.device_kind, "process": d.process_index}
        for d in jax.devices()
    ]
    datasets = data.available_datasets()
    report = {
        "versions": versions,
        "backend": jax.default_backend(),
        "devices": devices,
        "datasets": datasets,
        "dataset_specs": list(data.DATASET_SPECS),
        "models": list(zoo.MODEL_NAMES),
    }
    human = ["versions:"]
    human += [f"  {k:<20} {v}" for k, v in versions.items()]
    human.append(f"devices ({jax.default_backend()}):")
    human += [f"  {d['id']}: {d['platform']} {d['kind']}" for d in devices]
    human.append("data sets:")
    human += [
        f"  {name:<14} {'yes' if d['available'] else 'no ':<4} {d['detail']}"
        for name, d in datasets.items()
    ]
    human.append(
        "  also: idx:DIR (MNIST-format directory), npz:PATH (x_train, y_train, x_test, y_test)"
    )
    human.append(f"models: {', '.join(zoo.MODEL_NAMES)}")
    _emit(args, report, human)
    return 0


# --------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    from deepfault_jax import __version__
    from deepfault_jax.zoo import MODEL_NAMES as model_names

    dataset_help = (
        "data set: digits, fashion-mnist, idx:DIR, tfds:NAME[:SPLIT] or npz:PATH (default: digits)"
    )
    parser = _Parser(
        prog="deepfault-jax",
        description="DeepFault fault localization for deep neural networks, in JAX.",
    )
    parser.add_argument("--version", action="version", version=f"deepfault-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser(
        "train",
        help="train a zoo model and save a checkpoint",
        description="Train a zoo model with optax Adam and save an orbax checkpoint "
        "with a model.json describing it.",
    )
    p.add_argument("--model", default="mlp-3x50", choices=model_names, metavar="NAME",
                   help=f"architecture: {', '.join(model_names)} (default: mlp-3x50)")  # fmt: skip
    p.add_argument("--dataset", default="digits", metavar="SPEC", help=dataset_help)
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs (default: 40 below 10,000 training images, else 10)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam step (default: 1e-3)")
    p.add_argument("--activation", default="relu", choices=("relu", "leaky_relu"),
                   help="hidden activation (default: relu)")  # fmt: skip
    p.add_argument("--out", metavar="DIR", default=None,
                   help="checkpoint directory (default: runs/MODEL-DATASET-seedN)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "info",
        help="versions, devices and the data sets available here",
        description="Show package versions, JAX devices, and which data sets can be loaded here.",
    )
    common(p)
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code (also used as the console script)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
        return args.func(args)
    except SystemExit as e:  # --help and --version
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        prog = getattr(e, "prog", "deepfault-jax")
        sys.stderr.write(f"{prog}: error: {_one_line(e)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("deepfault-jax: interrupted\n")
        return 130
    except Exception as e:  # an internal error: show everything
        traceback.print_exc()
        sys.stderr.write(f"deepfault-jax: internal error: {_one_line(e)}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
