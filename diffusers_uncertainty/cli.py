"""`diffusers-uncertainty` (also `python -m diffusers_uncertainty`): the whole workflow from one command."""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from .workflow import shipped_configs

    parser = argparse.ArgumentParser(
        prog="diffusers-uncertainty",
        description=(
            "Labeled target-like synthetic data from labeled source and unlabeled target images. Without a "
            "subcommand, `run` is assumed; without --config, the embedded two-domain OCT-like example runs."
        ),
    )
    subcommands = parser.add_subparsers(dest="command")

    run = subcommands.add_parser("run", help="Run the workflow (stages already complete are skipped).")
    run.add_argument(
        "--config",
        default=None,
        help=f"YAML file, or the name of a config shipped with the package ({', '.join(shipped_configs())}); default:"
        " toy_oct.",
    )
    run.add_argument("--scale", default=None, help="A named scale of the config's `scales:` section (e.g. gpu, smoke).")
    run.add_argument("--smoke", action="store_true", help="Short for `--scale smoke` (a small CPU machine).")
    run.add_argument("--output_dir", default=None, help="Overrides the config's output_dir.")
    run.add_argument("--data_root", default=None, help="Data folder; overrides the config's data.root.")
    run.add_argument("--only", nargs="+", default=None, help="Run only stages whose name starts with these.")
    run.add_argument("--force", action="store_true", help="Re-run stages even when complete.")

    stages = subcommands.add_parser("stages", help="List the stages and commands a config would run.")
    stages.add_argument("--config", default=None, help="As for `run`.")
    stages.add_argument("--scale", default=None)
    stages.add_argument("--smoke", action="store_true")
    stages.add_argument("--output_dir", default=None)
    stages.add_argument("--data_root", default=None, help="Data folder; overrides the config's data.root.")
    stages.add_argument("--check", action="store_true",
                        help="Also make the checks `run` makes before its first stage (every stage's flags, the data "
                             "root's images and label maps, a pretrained base), without running anything.")

    prepare = subcommands.add_parser(
        "prepare", help="Build a dataset in the package's layout: from its public source, as tiles, or with FDA copies."
    )
    dataset_parsers = prepare.add_subparsers(dest="dataset", required=True)
    camvid = dataset_parsers.add_parser(
        "camvid-daydusk",
        help="CamVid day -> dusk from the SegNet tutorial's CamVid/ folder (240x180, 11 classes + void).",
    )
    camvid.add_argument("--camvid_dir", required=True, help="The CamVid/ folder: train/, trainannot/, val/, ...")
    camvid.add_argument("--output_dir", required=True, help="Where the dataset goes (empty or new folder).")
    tiles = dataset_parsers.add_parser(
        "tiles",
        help="Cut every image (and label map) of a dataset in the package's layout into a grid of native-resolution "
        "tiles, e.g. histology fields too large to resize.",
    )
    tiles.add_argument("--input_dir", required=True, help="A dataset: <domain>/<split>/images/ (+ labels/).")
    tiles.add_argument("--output_dir", required=True, help="Where the tiled dataset goes (empty or new folder).")
    tiles.add_argument("--grid", type=int, required=True, help="Tiles per side: an image gives grid x grid tiles.")
    tiles.add_argument(
        "--splits",
        nargs="+",
        default=None,
        help="Splits to tile, each NAME or NAME:NEW_NAME (e.g. source/test:source/val); default: every split.",
    )

    fda = dataset_parsers.add_parser(
        "fda-copies",
        help="A labeled folder again with an FDA copy of each image (the low-frequency amplitude of a random target "
        "image, same label map), for training a control on both looks of each layout.",
    )
    fda.add_argument("--labeled_dir", required=True, help="A labeled folder: images/ and labels/.")
    fda.add_argument("--target_dir", required=True, help="Unlabeled target images (their amplitude spectra).")
    fda.add_argument("--output_dir", required=True, help="Where the labeled folder goes (empty or new folder).")
    fda.add_argument("--beta", type=float, default=0.03, help="FDA window, a fraction of the shorter side.")
    fda.add_argument("--seed", type=int, default=0, help="Draws the target image of each copy.")

    toy = subcommands.add_parser("make-toy-data", help="Write the embedded two-domain OCT-like dataset to a folder.")
    toy.add_argument("root", help="Output folder (must be empty or absent).")
    toy.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    args = parser.parse_args(argv)

    from .workflow import check_workflow, load_config, plan, run_workflow

    if args.command == "prepare" and args.dataset == "tiles":
        from .prepare import prepare_tiles

        result = prepare_tiles(args.input_dir, args.output_dir, args.grid, args.splits)
        counts = ", ".join(f"{split} {count}" for split, count in result["splits"].items())
        sizes = ", ".join(f"{w}x{h}" for w, h in result["tile_sizes"])
        print(f"Wrote {sizes} tiles to {result['output_dir']} ({counts}).")
        return 0
    if args.command == "prepare" and args.dataset == "fda-copies":
        from .prepare import prepare_fda_copies

        result = prepare_fda_copies(args.labeled_dir, args.target_dir, args.output_dir, args.beta, args.seed)
        print(f"Wrote {result['images']} labeled images and {result['copies']} FDA copies (beta {args.beta}) to "
              f"{result['output_dir']}.")
        return 0
    if args.command == "prepare":
        from .prepare import prepare_camvid_daydusk

        result = prepare_camvid_daydusk(args.camvid_dir, args.output_dir)
        counts = ", ".join(f"{split} {count}" for split, count in result["splits"].items())
        print(f"Wrote CamVid day -> dusk to {result['output_dir']} ({counts}).")
        return 0
    if args.command == "make-toy-data":
        from .toy_oct import make_oct_dataset

        make_oct_dataset(args.root, seed=args.seed)
        print(f"Wrote the toy OCT dataset to {args.root}")
        return 0
    overrides = {}
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    if args.data_root:
        overrides["data"] = {"root": args.data_root}
    config = load_config(args.config, smoke=args.smoke, overrides=overrides, scale=args.scale)
    if args.command == "stages":
        if args.check:
            check_workflow(config)
        for stage in plan(config):
            status = "complete" if stage.is_complete() else "to run"
            how = " ".join(stage.command([])) if stage.script else f"(in-process) -> {stage.output}"
            print(f"{stage.name:<36} {status:<9} {how}")
        return 0
    report = run_workflow(config, only=args.only, force=args.force)
    print(f"Report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
