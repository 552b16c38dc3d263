"""``visualizer view``: one self-contained HTML page of the attention of one key of a saved file."""
import argparse
import os
from typing import Any

from ._common import FORMATTER, OK, Say, add_quiet, add_sample, error, load, require

_DESCRIPTION = """\
Write one self-contained HTML page (no network needed to open it) of the
attention maps of one key of a saved file: each captured call is one layer.
Token strings and the image the model saw are used when the file holds them
(save with visualizer.views.save(path, cache, tokens=..., image=...));
otherwise tokens are shown as their positions."""


def add_parser(commands: Any) -> None:
    """Add ``view`` to the subparsers ``commands``."""
    parser = commands.add_parser(
        "view", help="an interactive HTML page from a file saved by 'run' or get_local.save",
        description=_DESCRIPTION, formatter_class=FORMATTER)
    parser.add_argument("file", metavar="FILE",
                        help="a .npz file written by 'visualizer run', get_local.save or "
                             "visualizer.views.save (or a rank manifest, or a stream folder)")
    parser.add_argument("--out", "-o", metavar="PAGE.html", required=True,
                        help="the HTML file to write (its folder is created if needed)")
    parser.add_argument("--key", "-k", metavar="KEY",
                        help="the captured key to show (needed when the file holds several)")
    parser.add_argument("--view", choices=("head", "model", "image", "generation"),
                        help="which view (default: image if the file holds an image, "
                             "generation if it holds a prompt length, else model)")
    add_sample(parser, "show")
    add_quiet(parser, argparse.SUPPRESS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, say: Say) -> int:
    """Write the page of one attention key of ``args.file`` to ``args.out``."""
    require("numpy", "view")
    if os.path.isdir(args.out):
        raise error("--out {} is a folder; name the .html file to write".format(args.out))
    from .. import views

    cache, context = load(args.file, "view", say, context=True)
    if args.key is None:
        keys = views._attention_keys(cache)
        if len(keys) > 1:
            raise error("{} holds attention maps under {} keys ({}); pick one with --key"
                        .format(args.file, len(keys), ", ".join(keys)))
    [(key, page)] = views.views_from_cache(cache, context, key=args.key, view=args.view,
                                           sample=args.sample)[:1]
    page.save(args.out)
    say("wrote {} ({} view of {!r}, {:.1f} MB): open it in a browser".format(
        args.out, page.view, key, page.nbytes / 1e6))
    return OK
