"""The ``stealthmark`` command: keygen, embed, verify, evaluate, serve, demo.

Errors a user can cause print one clear line and exit non-zero (2 bad input, 3 resources, 130 cancelled).
``--progress json`` writes one JSON object per line on stdout (for the 3D Slicer module), ending with a
``result`` or an ``error`` event; otherwise a progress bar is drawn on stderr and results go to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from . import DEFAULT_EMBED_STEPS, DEMO_EMBED_STEPS, DEMO_KEEP_MASKS_EMBED_STEPS, KEEP_MASKS_EMBED_STEPS, __version__
from .distributed import launched_rank, launched_world_size
from .errors import Cancelled, InputError, ResourceError, StealthMarkError
from .progress import JsonProgress, Progress, make_progress

DEVICES = ("auto", "cpu", "cuda")
METHODS = ("stealthmark", "reference", "badnets")   # = baselines.METHODS (not imported here: --help stays fast)


def _common(p: argparse.ArgumentParser, device: bool = True) -> None:
    if device:
        p.add_argument("--device", choices=DEVICES, default="auto",
                       help="where the model runs: auto (a CUDA GPU when there is one), cpu or cuda (default auto)")
    p.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                   help="progress display: a bar on stderr, JSON lines on stdout (for the Slicer module), or none")


def _model_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--logits", action="store_true",
                   help="the model returns logits, not probabilities: apply softmax (or sigmoid for 1 channel)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="the model's input size, when its file does not record it (2-D models; a 3-D model's "
                        "spec records its ROI [D, H, W])")


def _data_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a volume file or DICOM series folder (with --labels), a folder of "
                   "volumes with label volumes, or a folder with images/ and masks/ (or labels/) PNG/JPEG images "
                   "of the same names (read as RGB for a model with 3 input channels); for a 3-D model, one "
                   "volume with --labels, cut into slabs of its ROI depth")
    p.add_argument("--labels", help="the label volume for a single volume or DICOM series")
    p.add_argument("--label", help="which label is the structure when the labels are not binary: a number, "
                   "or 'any' for every non-zero label; without it, a multi-class model (K > 2) keeps every label "
                   "as a class")


def _method_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=METHODS, default="stealthmark",
                   help="stealthmark (default), or a baseline for comparison: reference (the paper's reference "
                        "design, whose QR appears for any model) or badnets (a harmful backdoor); README 'Baselines'")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="stealthmark",
        description="Harmless, black-box verifiable ownership watermarks for medical segmentation models "
                    "(StealthMark). Run 'stealthmark COMMAND --help' for each command.")
    ap.add_argument("--version", action="version", version=f"stealthmark {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    k = sub.add_parser("keygen", help="create a secret key and print its commitment",
                       description="Create a secret watermark key (JSON). Keep it private; register the printed "
                                   "SHA-256 commitment so that you can prove later that this key is yours.")
    k.add_argument("--payload", required=True, help="the owner string the QR code carries, e.g. SM:ACME-0001")
    k.add_argument("--out", required=True, help="where to write the key file (never overwritten without --force)")
    k.add_argument("--version", dest="qr_version", type=int, default=1,
                   help="QR version: 1 (21x21 modules, for 128 px models) or 2 (25x25, for >= 256 px); default 1")
    k.add_argument("--level", default="M", choices=("L", "M", "Q", "H"), help="QR error correction (default M)")
    k.add_argument("--mask", type=int, default=0, help="QR mask pattern 0-7 (default 0)")
    k.add_argument("--mode", default="blended", choices=("key-image", "blended", "stamped"),
                   help="trigger mode (default blended; stamped is experimental)")
    k.add_argument("--samples", type=int, default=1000, help="LIME samples per trigger image (default 1000)")
    k.add_argument("--tile", type=int, default=4,
                   help="side in pixels of the secret texture tile, at most the cell size: 4 for 128 px models "
                        "(6 px cells), 3 for 64 px models (3 px cells); default 4")
    k.add_argument("--force", action="store_true", help="replace an existing key file")
    _common(k, device=False)

    e = sub.add_parser("embed", help="watermark a model by fine-tuning",
                       description="Fine-tune a copy of a model so that the key's trigger spells the QR in its "
                                   "uncertainty; writes OUT in the input's format and OUT's harmlessness JSON. "
                                   "Under torchrun (torchrun --nproc_per_node=K -m StealthMarkLib.cli embed ...) "
                                   "K processes train together, each on its own batch (K times the batch), "
                                   "gradients averaged (nccl on GPUs, gloo on the CPU); rank 0 writes and "
                                   "reports. See README 'Distributed embedding'.")
    e.add_argument("--model", required=True, help="TorchScript file, state dict with a JSON spec, or MONAI bundle "
                   "(folder or .zip; OUT is then a bundle of the same layout); 2-D, or a 3-D UNet (spec or bundle "
                   "spatial_dims 3); not ONNX (verification only)")
    e.add_argument("--spec", help="JSON spec of a state dict (default: MODEL's name with .json)")
    _data_opts(e)
    e.add_argument("--key", required=True, help="the key file from 'stealthmark keygen'")
    e.add_argument("--out", required=True, help="the watermarked model to write (never the input)")
    e.add_argument("--steps", type=int, default=None,
                   help=f"fine-tuning steps (default {KEEP_MASKS_EMBED_STEPS}; {DEFAULT_EMBED_STEPS} with "
                        "--no-keep-trigger-masks)")
    e.add_argument("--keep-trigger-masks", action=argparse.BooleanOptionalAction, default=None,
                   help="the key image keeps the mask the original gives it (key-blended slices take the same "
                        "mask): the default; --no-keep-trigger-masks: the earlier recipe, which empties the key "
                        "image's mask and learns in half the steps (README 'How it works')")
    e.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="images (slabs for a 3-D model) a step: N clean and N trigger inputs, N/2 decoys (default "
                        "8); lower it when memory runs out, e.g. 4 for the 3-D UNet of README '3-D models'")
    e.add_argument("--per-cell-decoys", action=argparse.BooleanOptionalAction, default=None,
                   help="decoy images with a random tile in every cell (the default); --no-per-cell-decoys: one "
                        "random other secret tile in all dark cells, the earlier recipe, which the SamViT "
                        "record of benchmarks/results/models.json was measured with, beside "
                        "--no-keep-trigger-masks (README 'Architectures')")
    _method_opt(e)
    _model_opts(e)
    _common(e)

    v = sub.add_parser("verify", help="verify ownership black-box (LIME, QR, p-value)",
                       description="Verify a model through its outputs only: LIME on trigger inputs, QR decode, "
                                   "binomial p-value. Without an input, verifies on the key image. A 3-D model "
                                   "(spec spatial_dims 3) is verified on slabs of its ROI depth: the key slab, or "
                                   "the key blended into runs of slices of --volume/--dicom, LIME hiding whole "
                                   "columns of the key grid.")
    who = v.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", help="TorchScript file, state dict with a JSON spec, MONAI bundle (folder or .zip) "
                     "or ONNX file; 2-D, or a 3-D UNet (spec spatial_dims 3) in any of these formats")
    who.add_argument("--endpoint", metavar="URL", help="a model you can only query over HTTP (stealthmark-remote/1, "
                     "as 'stealthmark serve' answers; see README)")
    who.add_argument("--command", dest="tool", metavar="TEMPLATE", help="a tool run once per batch, e.g. 'vendor-seg {input} "
                     "{output}' (.npy in and out; split like a shell line, run without a shell)")
    v.add_argument("--timeout", type=float, default=60, help="seconds per --endpoint request or --command run "
                   "(default 60)")
    v.add_argument("--retries", type=int, default=0, help="retries of an --endpoint request that timed out, "
                   "could not connect or got HTTP 5xx (default 0)")
    v.add_argument("--in-channels", type=int, help="input channels of a --command tool (default 1)")
    v.add_argument("--num-classes", type=int, help="classes of a --command tool (default: one probe call)")
    v.add_argument("--spec", help="JSON model spec: of a state dict --model (default: MODEL's name with .json); of "
                   "a --command tool, instead of --image-size (a 3-D tool: spatial_dims 3, image_size [D, H, W], "
                   "in_channels, num_classes); for --endpoint, what its /info leaves null (a 3-D ROI)")
    v.add_argument("--key", required=True, help="the owner's key file")
    src = v.add_mutually_exclusive_group()
    src.add_argument("--image", help="a 2-D image (PNG/JPEG or a one-slice volume) to blend the key into "
                     "(2-D models)")
    src.add_argument("--volume", help="a volume file (NIfTI, NRRD, MHA) to blend the key into slice by slice "
                     "(a 3-D model: into slabs of its ROI depth)")
    src.add_argument("--dicom", help="a DICOM series folder to blend the key into slice by slice")
    v.add_argument("--slices", help="slices of the volume: 'auto' (default: --n-slices spread over its middle), "
                   "'all', '10:50:2' or '12,14,20'; for a 3-D model whole slabs of its ROI depth D, consecutive "
                   "chosen slices forming one slab each (auto: one central slab; '20:36' two slabs of 8)")
    v.add_argument("--n-slices", type=int, default=4, help="slices chosen by --slices auto (default 4)")
    v.add_argument("--samples", type=int, help="LIME samples per trigger image (default: the key's, 1000, raised "
                   "so that a verification makes at least 4000 queries: 4000 on the key image alone)")
    v.add_argument("--seed", type=int, help="LIME sampling seed (default: the key's)")
    v.add_argument("--null-keys", type=int, default=0, metavar="K",
                   help="also verify with K >= 2 random keys (the key's payload and settings, fresh textures) and "
                        "report the key's agreement against theirs: z score and rank p-value, report.json "
                        "'null_keys' (default 0: none; each costs one more verification)")
    v.add_argument("--strength", type=float, help="blend strength of the key (default: the key's)")
    v.add_argument("--batch-size", type=int, default=64, help="queries per forward pass (default 64)")
    v.add_argument("--out", required=True, help="folder for report.json, report.html, qr.png (and lime_map.nii.gz)")
    _method_opt(v)
    v.add_argument("--detector", help="--method reference: the <model>.detector.json written by its embedding")
    _model_opts(v)
    _common(v)

    ev = sub.add_parser("evaluate", help="harmlessness of a watermarked model against its original",
                        description="Dice, IoU, HD95, surface Dice, pixel AUC, ECE, Brier and argmax flip rate "
                                    "of the watermarked model against the original, on held-out slices of DATA.")
    ev.add_argument("--model", required=True, help="the watermarked model")
    ev.add_argument("--reference", required=True, help="the original model")
    _data_opts(ev)
    ev.add_argument("--key", required=True, help="the key (for the trigger figures)")
    ev.add_argument("--out", required=True, help="JSON file to write")
    _model_opts(ev)
    _common(ev)

    s = sub.add_parser("serve", help="serve a model over HTTP for 'verify --endpoint' (reference server)",
                       description="Answer the stealthmark-remote/1 protocol (GET /info, POST /predict with .npy "
                                   "bodies) for a model file, until Ctrl-C or SIGTERM. Binds loopback by default. "
                                   "For a 3-D model /info says spatial_dims 3 and its ROI [D, H, W], and the "
                                   "arrays are (B, C, D, H, W) in and (B, K, D, H, W) out.")
    s.add_argument("--model", required=True, help="TorchScript file, state dict with a JSON spec, MONAI bundle "
                   "or ONNX file; a 3-D model (spec spatial_dims 3) is served on its ROI: (B, C, D, H, W) volumes")
    s.add_argument("--spec", help="JSON spec of a state dict (default: MODEL's name with .json)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    s.add_argument("--max-batch", type=int, default=64, help="most images per request (default 64)")
    s.add_argument("--max-body-mb", type=float, default=256, help="largest request body in MiB (default 256)")
    _model_opts(s)
    _common(s)

    d = sub.add_parser("demo", help="end-to-end demo on the bundled real brain MRI",
                       description="Train a small clean MONAI UNet on the bundled T1 MRI, create a key, embed, "
                                   "verify the watermarked and the clean model, measure harmlessness, print a "
                                   "table. Exits 0 only if the watermarked model is owned and the clean one not.")
    d.add_argument("--out", default="stealthmark-demo", help="output folder (default ./stealthmark-demo)")
    d.add_argument("--clean-steps", type=int, default=300, help="training steps of the clean model (default 300)")
    d.add_argument("--embed-steps", type=int, default=None,
                   help=f"embedding steps (default {DEMO_KEEP_MASKS_EMBED_STEPS}, so that the demo takes under 5 "
                        f"minutes on a 2-core CPU; the library's default is {KEEP_MASKS_EMBED_STEPS}; "
                        f"{DEMO_EMBED_STEPS} with --no-keep-trigger-masks, whose library default is "
                        f"{DEFAULT_EMBED_STEPS})")
    d.add_argument("--keep-trigger-masks", action=argparse.BooleanOptionalAction, default=True,
                   help="embed with the library's default recipe, which keeps the key image's mask (the default); "
                        "--no-keep-trigger-masks: the earlier recipe, which empties it ('embed "
                        "--no-keep-trigger-masks')")
    d.add_argument("--samples", type=int, help="LIME samples per trigger image (default: 1000 per slice, 4000 "
                   "on the key image alone)")
    d.add_argument("--n-slices", type=int, default=4, help="held-out slices to verify on (default 4)")
    d.add_argument("--random-key", action="store_true", help="draw a fresh secret key instead of the demo's "
                   "published one (random keys may not decode on the key image: see README)")
    _common(d)
    return ap


def _pair(v: Any) -> tuple[int, int] | None:
    return tuple(v) if v else None


def _label(v: str | None) -> int | str | None:
    if v is None or v == "any":
        return v
    try:
        return int(v)
    except ValueError:
        raise InputError(f"--label must be a number or 'any', not {v!r}") from None


def _embed_config(args: argparse.Namespace):
    """The EmbedConfig of 'embed': the library's defaults, with --[no-]keep-trigger-masks, --[no-]per-cell-decoys
    and --batch-size."""
    from .embed import EmbedConfig, batch_settings

    pcd = {} if args.per_cell_decoys is None else {"per_cell_decoys": args.per_cell_decoys}
    batch = {} if args.batch_size is None else batch_settings(args.batch_size, "--batch-size")
    keep = {} if args.keep_trigger_masks is None else {"keep_trigger_masks": args.keep_trigger_masks}
    return EmbedConfig(**keep, **pcd, **batch)


def embed_steps(args: argparse.Namespace) -> int:
    """'embed --steps', or its recipe's default (embed.recipe_steps: KEEP_MASKS_EMBED_STEPS, DEFAULT_EMBED_STEPS with
    --no-keep-trigger-masks)."""
    if args.steps is not None:
        return args.steps
    from .embed import EmbedConfig, recipe_steps

    keep = EmbedConfig.keep_trigger_masks if args.keep_trigger_masks is None else args.keep_trigger_masks
    return recipe_steps(keep)


def run(args: argparse.Namespace, progress: Progress) -> tuple[dict[str, Any] | None, str, int]:
    """Run one command; returns (result for JSON, text for the terminal, exit code); the result is None on
    the ranks other than 0 of a distributed embedding, which report nothing."""
    from . import workflows as wf

    if launched_world_size() > 1 and (args.command != "embed" or
                                    getattr(args, "method", "stealthmark") != "stealthmark"):
        raise InputError("under torchrun only 'embed' (with --method stealthmark) runs distributed: run "
                         f"'{args.command}' as one process")
    if args.command == "embed":
        args.steps = embed_steps(args)
    if getattr(args, "method", "stealthmark") != "stealthmark":
        keep = getattr(args, "keep_trigger_masks", None) if args.command == "embed" else None
        recipe = {"--keep-trigger-masks": keep is True, "--no-keep-trigger-masks": keep is False,
                  "--per-cell-decoys": getattr(args, "per_cell_decoys", None) is True,
                  "--no-per-cell-decoys": getattr(args, "per_cell_decoys", None) is False,
                  "--batch-size": args.command == "embed" and getattr(args, "batch_size", None) is not None}
        for flag in (f for f, given in recipe.items() if given):
            raise InputError(f"{flag} is for --method stealthmark; the baselines train their own trigger targets")
        if getattr(args, "null_keys", 0):
            raise InputError("--null-keys is for --method stealthmark")
        from .baselines import run_from_args

        return run_from_args(args, progress, label=_label(args.label) if args.command == "embed" else None,
                             image_size=_pair(args.image_size))
    if getattr(args, "detector", None) is not None:
        raise InputError("--detector is only used with --method reference")
    if args.command == "keygen":
        key = wf.make_key(args.payload, args.out, force=args.force, version=args.qr_version, level=args.level,
                          mask=args.mask, mode=args.mode, samples=args.samples, tile=args.tile)
        return ({"key": str(args.out), "commitment": key.commitment, **key.public_summary()},
                f"wrote {args.out}\ncommitment (SHA-256): {key.commitment}\n"
                "Keep the key file secret; register the commitment to prove ownership later.", 0)
    if args.command == "embed":
        r = wf.run_embed(args.model, args.data, args.key, args.out, labels=args.labels, label=_label(args.label),
                         spec=args.spec, steps=args.steps, device=args.device, logits=args.logits,
                         image_size=_pair(args.image_size), progress=progress,
                         config=_embed_config(args))
        if r is None:   # another rank of a distributed run: rank 0 reports
            return None, "", 0
        h = r.harmlessness
        text = (f"wrote {r.model} ({r.format}) and {r.harmlessness_file}\n"
                f"held-out Dice {h['original']['dice']:.4f} -> {h['watermarked']['dice']:.4f} "
                f"(drop {h['dice_drop_points']:.2f} points), IoU {h['original']['iou']:.4f} -> "
                f"{h['watermarked']['iou']:.4f}, HD95 {h['original']['hd95']:.2f} -> {h['watermarked']['hd95']:.2f} px, "
                f"AUC {h['original']['auc']:.4f} -> {h['watermarked']['auc']:.4f}, "
                f"ECE {h['original']['ece']:.4f} -> {h['watermarked']['ece']:.4f}, "
                f"flip rate {h['flip_rate_clean']:.3%}\ndevice {r.device}; {r.log['seconds']:.0f} s")
        return r.to_json(), text, 0
    if args.command == "verify":
        model = args.model
        if args.endpoint or args.tool:
            from . import remote

            if (args.in_channels or args.num_classes) and not args.tool:
                raise InputError("--in-channels and --num-classes are for --command (an endpoint's /info says them)")
            model = (remote.open_endpoint(args.endpoint, timeout=args.timeout, retries=args.retries,
                                          max_batch=args.batch_size, logits=args.logits,
                                          image_size=_pair(args.image_size), spec=args.spec) if args.endpoint else
                     remote.open_command(args.tool, _pair(args.image_size), in_channels=args.in_channels,
                                         num_classes=args.num_classes, timeout=args.timeout,
                                         max_batch=args.batch_size, logits=args.logits, spec=args.spec))
            image_size = None if model.spatial_dims == 3 else _pair(args.image_size)  # already checked
        else:
            image_size = _pair(args.image_size)
        v = wf.run_verify(model, args.key, args.out, image=args.image, volume=args.volume, dicom=args.dicom,
                          slices=args.slices, n_slices=args.n_slices, samples=args.samples, seed=args.seed,
                          strength=args.strength, device=args.device, logits=args.logits,
                          batch_size=args.batch_size, image_size=image_size, spec=args.spec,
                          null_keys=args.null_keys, progress=progress)
        r = v.report
        files = {"report_json": str(Path(args.out) / "report.json"), "report_html": str(Path(args.out) / "report.html"),
                 "qr": str(Path(args.out) / "qr.png")}
        if args.volume or args.dicom:
            files["lime_map"] = str(Path(args.out) / "lime_map.nii.gz")
        brief = {k: v for k, v in r.to_json().items() if k not in ("attribution", "observed_modules")}
        from .report import null_keys_summary

        nk = r.null_keys
        against = (f"\nagainst {null_keys_summary(nk)} ({nk['n_queries']} more queries, {nk['seconds']:.1f} s)"
                   if nk else "")
        return ({**brief, "files": files},
                f"{r.summary}{against}\ndevice {r.device}; {r.n_queries} queries in {r.seconds['total']:.1f} s; "
                f"report in {args.out}", 0)
    if args.command == "evaluate":
        h = wf.run_evaluate(args.model, args.reference, args.data, args.key, args.out, labels=args.labels,
                            label=_label(args.label), device=args.device, logits=args.logits,
                            image_size=_pair(args.image_size))
        return (h, f"held-out Dice {h['original']['dice']:.4f} -> {h['watermarked']['dice']:.4f} "
                   f"(drop {h['dice_drop_points']:.2f} points); flip rate {h['flip_rate_clean']:.3%}; "
                   f"wrote {args.out}", 0)
    if args.command == "serve":
        from .remote import run_serve

        def announce(line: str, info: dict) -> None:
            progress.emit("serving", **info) if isinstance(progress, JsonProgress) else print(line, flush=True)

        r = run_serve(args.model, spec=args.spec, host=args.host, port=args.port, device=args.device,
                      logits=args.logits, image_size=_pair(args.image_size), max_batch=args.max_batch,
                      max_body_mb=args.max_body_mb, progress=progress, announce=announce)
        return r, f"stopped serving {r['url']} after {r['predict_requests']} prediction request(s)", 0
    if args.command == "demo":
        from .demo import DemoSettings, check_settings, format_table, run_demo

        s = DemoSettings(out=Path(args.out), clean_steps=args.clean_steps, embed_steps=args.embed_steps,
                         samples=args.samples, n_slices=args.n_slices, device=args.device,
                         keep_trigger_masks=args.keep_trigger_masks,
                         **({"key_seed": None} if args.random_key else {}))
        check_settings(s)
        summary, ok = run_demo(s, progress)
        return summary, format_table(summary), 0 if ok else 1
    raise AssertionError(args.command)  # pragma: no cover - argparse rejects unknown commands


def _install_signal_handlers(progress: Progress) -> dict[int, Any]:
    """SIGINT/SIGTERM cancel the run at its next check (a second signal stops at once); returns the old ones."""

    def handler(signum: int, _frame: Any) -> None:
        if progress.cancelled:
            os._exit(130)
        progress.cancel()

    old: dict[int, Any] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread (e.g. called from a worker thread): no handlers
        pass
    return old


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = make_progress(args.progress)
    if args.progress == "json":
        warnings.simplefilter("ignore")
    else:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    old_handlers = _install_signal_handlers(progress)
    try:
        result, text, code = run(args, progress)
    except StealthMarkError as exc:
        return _fail(progress, exc, exc.exit_code)
    except MemoryError:
        return _fail(progress, ResourceError("out of memory: use fewer --samples, a smaller --batch-size, "
                                             "or fewer slices"), 3)
    except Exception as exc:  # torch OOM arrives as RuntimeError subclasses
        if "out of memory" in str(exc).lower():
            return _fail(progress, ResourceError("out of GPU memory: lower --batch-size or use --device cpu"), 3)
        raise
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    if result is None:
        return code
    if isinstance(progress, JsonProgress):
        progress.emit("result", **json.loads(json.dumps(result, default=str)))
    else:
        try:
            print(text, flush=True)
        except BrokenPipeError:   # e.g. `stealthmark verify ... | head -1`: the reader has gone, not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


def _fail(progress: Progress, exc: StealthMarkError, code: int) -> int:
    msg = str(exc) if not isinstance(exc, Cancelled) else "cancelled: nothing was written"
    try:
        rank = launched_rank()
    except InputError:   # a broken torchrun environment: reported like any other error, by this process
        rank = 0
    if rank:   # another rank of a distributed run: its error on stderr, marked, never on the JSON stream
        print(f"stealthmark: error (rank {rank}): {msg}", file=sys.stderr, flush=True)
        return code
    if isinstance(progress, JsonProgress):
        progress.emit("error", message=msg, exit_code=code)
    print(f"stealthmark: error: {msg}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
