"""``vefast <command>``: the command-line entry point.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``;
modules are imported only when their command runs. A module's ``USER_ERRORS`` (a tuple of exception
types, default none) are the user's mistakes: ``vefast <command>: <message>`` on stderr and exit 2,
without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("vefast.recipes.info_cmd", "print what is available on this machine and why not"),
    "toy": ("vefast.recipes.toy", "2D toy: KL vs VE tokenizer + flow model on a tree-shaped Gaussian mixture"),
    "vr-table": ("vefast.recipes.vr_table", "estimate the separation function and build a VR timestep table"),
    "train-tokenizer": ("vefast.recipes.tokenizer", "train a VE/KL tokenizer with DINOv2 alignment, LPIPS and GAN"),
    "extract-latents": ("vefast.recipes.extract_latents", "encode a dataset to latent shards with a trained tokenizer"),
    "extract-features": ("vefast.recipes.extract_features", "precompute a tokenizer config's DINOv2 targets into shards"),
    "train-dit": ("vefast.recipes.dit", "train DiT/SiT/LightningDiT with flow matching on latents"),
    "sample": ("vefast.recipes.sample", "sample a train-dit run to an ADM-format .npz (torchrun for many GPUs)"),
    "fid": ("vefast.recipes.fid", "FID / sFID / IS / precision / recall of an .npz against an ADM reference batch"),
    "plot": ("vefast.recipes.plot", "draw a run's metrics.jsonl curves to a PNG"),
}


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" for options that have a meaningful default (not None, False or [])."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Give options without a help text one that shows their default (argparse shows no line otherwise)."""
    for action in parser._actions:
        if action.help is None and action.default not in (None, False, []):
            action.help = "(default: %(default)s)"


DESCRIPTION = ("vefast: fused Triton/CUDA kernels for training latent diffusion models, and training recipes "
               "that use them. Run `vefast COMMAND --help` for a command's options.")


def build_parser(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="vefast", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=_HelpWithDefaults)
        if name == chosen:  # import only the module of the command that runs
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            _show_defaults(p)
            modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = modules[args.command]
    try:
        return int(module.main(args) or 0)
    except getattr(module, "USER_ERRORS", ()) as e:
        print(f"vefast {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
