"""CLI verbs of regscale.models: `register` adds their sub-parsers; handlers import lazily."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_VAES = ("stabilityai/sd-vae-ft-mse", "stabilityai/sd-vae-ft-ema")


def register(verbs: argparse._SubParsersAction) -> None:
    """Add this area's verbs to the `regscale` parser."""
    help = "download DINOv2 and SD-VAE weights into the Hugging Face cache (needs internet)"
    p = verbs.add_parser("fetch-weights", help=help, description=help + ". Training never downloads: "
                         "run this once on a machine with internet, then copy the cache ($HF_HOME) if needed.")
    p.add_argument("--encoder", default="vit_base_patch14_dinov2", help="timm DINOv2 name (default: %(default)s)")
    p.add_argument("--vae", action="append", metavar="REPO",
                   help=f"VAE repo id, repeatable (default: {' and '.join(DEFAULT_VAES)})")
    p.add_argument("--dry-run", action="store_true", help="print what would be fetched, fetch nothing")
    p.set_defaults(fn=cmd_fetch_weights)


def _targets(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(repo id, file name) pairs to download."""
    from regscale.errors import UserError, first_line
    from regscale.models.encoders import DINOV2_FILE, DINOV2_HUB, VAE_FILES

    if args.encoder not in DINOV2_HUB:
        raise UserError(f"--encoder '{args.encoder}' has no known Hub location (known: {', '.join(DINOV2_HUB)})")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    files = [(DINOV2_HUB[args.encoder], DINOV2_FILE)]
    for repo in args.vae or DEFAULT_VAES:
        try:
            validate_repo_id(repo)
        except HFValidationError as err:
            raise UserError(f"--vae {repo!r} is not a Hugging Face repo id ({first_line(err)})") from None
        files += [(repo, name) for name in VAE_FILES]
    return files


def _check_online(endpoint: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with one line, when the Hub cannot be reached."""
    import socket
    from urllib.parse import urlparse

    from regscale.errors import UserError

    parts = urlparse(endpoint)
    host = parts.hostname or endpoint
    try:
        port = parts.port or (80 if parts.scheme == "http" else 443)
        socket.create_connection((host, port), timeout=timeout).close()
    except (OSError, OverflowError, ValueError) as err:  # refused, no route, no such host, port out of range
        raise UserError(f"cannot reach {host} ({err}): run `regscale fetch-weights` on a machine with internet, "
                        "then copy its Hugging Face cache ($HF_HOME, default ~/.cache/huggingface) here") from None


def cmd_fetch_weights(args: argparse.Namespace) -> int:
    """Download the pretrained encoder and VAE files into the Hugging Face cache."""
    from huggingface_hub import constants, hf_hub_download

    from regscale.errors import UserError, first_line
    from regscale.paths import check_writable

    targets = _targets(args)
    print(f"Hugging Face cache: {constants.HF_HUB_CACHE}")
    for repo, name in targets:
        print(f"  {'would fetch' if args.dry_run else 'fetch'} {constants.ENDPOINT}/{repo}/{name}")
    if args.dry_run:
        return 0
    check_writable(Path(constants.HF_HUB_CACHE), "the Hugging Face cache (HF_HOME)")
    _check_online(constants.ENDPOINT)
    for repo, name in targets:
        try:
            path = hf_hub_download(repo, name)
        except Exception as err:  # network and Hub errors of every kind: one line naming the file
            raise UserError(f"could not fetch {repo}/{name}: {first_line(err, 200)}") from None
        print(f"  ok {repo}/{name} -> {path}")
    return 0
