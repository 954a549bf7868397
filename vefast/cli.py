"""``vefast <command>``: the command-line entry point.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``;
modules are imported only when their command runs.
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
    "train-dit": ("vefast.recipes.dit", "train DiT/SiT/LightningDiT with flow matching on latents"),
}


def build_parser(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="vefast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module of the command that runs
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(modules[args.command].main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
