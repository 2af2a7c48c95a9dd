#!/usr/bin/env bash
# Refresh the vendored JavaScript that lets the book render offline (see README.md here).
# Needs npm and the project's Python environment (for plotly.min.js); the book build never runs this.
#
#   book/_vendor/fetch.sh [PYTHON]      # PYTHON defaults to .venv/bin/python
set -euo pipefail

HTML_MANAGER_VERSION=1.0.15
MATHJAX_VERSION=3.2.2

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${1:-$here/../../.venv/bin/python}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

(cd "$tmp" && npm pack --silent "@jupyter-widgets/html-manager@$HTML_MANAGER_VERSION" "mathjax@$MATHJAX_VERSION" >/dev/null)
mkdir -p "$tmp/html-manager" "$tmp/mathjax"
tar xzf "$tmp/jupyter-widgets-html-manager-$HTML_MANAGER_VERSION.tgz" -C "$tmp/html-manager"
tar xzf "$tmp/mathjax-$MATHJAX_VERSION.tgz" -C "$tmp/mathjax"

# ipywidgets embed bundle (no require.js needed). Its Font Awesome @font-face rules list woff2 first,
# which every current browser takes, so only the woff2 files are kept beside it.
rm -rf "$here/html-manager"
mkdir -p "$here/html-manager"
cp "$tmp/html-manager/package/dist/embed.js" "$tmp/html-manager/package/dist/embed.js.LICENSE.txt" "$here/html-manager/"
cp "$tmp/html-manager/package/dist/"*.woff2 "$here/html-manager/"

# MathJax 3 with every TeX extension built in, so it never loads extensions at run time; it does load
# its CommonHTML fonts from output/chtml/fonts/woff-v2 relative to its own location.
rm -rf "$here/mathjax"
mkdir -p "$here/mathjax/output/chtml/fonts"
cp "$tmp/mathjax/package/es5/tex-chtml-full.js" "$tmp/mathjax/package/LICENSE" "$here/mathjax/"
cp -r "$tmp/mathjax/package/es5/output/chtml/fonts/woff-v2" "$here/mathjax/output/chtml/fonts/"

# plotly.js exactly as the installed plotly Python package ships it, so figures and library agree.
rm -rf "$here/plotly"
mkdir -p "$here/plotly"
"$python" - "$here/plotly" <<'PY'
import pathlib
import shutil
import sys

import plotly

package = pathlib.Path(plotly.__file__).parent
shutil.copy(package / "package_data" / "plotly.min.js", sys.argv[1])
print(f"plotly {plotly.__version__}")
PY
head -c 300 "$here/plotly/plotly.min.js" | grep -o 'plotly.js v[0-9.]*' || true
du -ah "$here" | sort -h | tail -5
