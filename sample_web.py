"""Sample from an exported DDPM in a web page: the same ONNX file as sample_ort.py, run by
onnxruntime-web (WebAssembly, or WebGPU where the browser offers it), the grid of x_t and the
predicted x_0 drawn at every step. No torch; nothing comes from a CDN.

  python sample_web.py --model ddpm.onnx            # serves http://127.0.0.1:8000/
  python sample_web.py --model ddpm.onnx --port 0   # any free port
  python sample_web.py --model ddpm.onnx --build site/   # a static folder for any web host

The page (web/: index.html, app.js, diffusion.js, plain JavaScript modules) reads the model's
ddpm.* metadata itself, computes the step tables (diffusion.js ports schedules.step_table; the
tests check them against Python's) and runs the exported update graphs of the metadata, the
ones sample_ort.py runs. onnxruntime-web is pinned in package.json and installed by `make
install` (npm ci). The server sends Cross-Origin-Opener-Policy and -Embedder-Policy, so the page
is cross-origin isolated and WebAssembly may use threads (docs/web.md).
"""

import argparse
import http.server
import os
import shutil
import sys

import files
import messages
import sample_ort

ROOT = os.path.dirname(os.path.abspath(__file__))
WEB = os.path.join(ROOT, "web")
ORT_DIST = os.path.join(ROOT, "node_modules", "onnxruntime-web", "dist")
PAGE = ("index.html", "app.js", "diffusion.js")
# onnxruntime-web's files the page loads: the module, and the WebAssembly build it imports
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm", "ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm")
HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
           "Cross-Origin-Resource-Policy": "same-origin", "Cache-Control": "no-cache"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript",
         ".wasm": "application/wasm", ".onnx": "application/octet-stream"}


def check_installed():
    """onnxruntime-web's files, or a ValueError saying what to run."""
    missing = [name for name in ORT_FILES if not os.path.isfile(os.path.join(ORT_DIST, name))]
    if missing:
        raise ValueError(f"onnxruntime-web is not installed (no {missing[0]} in {ORT_DIST}); run 'npm ci' in "
                         f"{ROOT} (make install does, where Node.js and npm are installed)")


def check_model(path):
    """The checks sample_ort.py makes: an ONNX file written by export.py whose update graphs load
    and update; a ValueError with a sentence otherwise."""
    _, _, meta, _ = sample_ort.open_sessions(path, "cpu")
    return meta


def routes(model):
    """URL path -> file: the page, onnxruntime-web's files under ort/, the model as model.onnx."""
    table = {"/" + name: os.path.join(WEB, name) for name in PAGE}
    table.update({"/ort/" + name: os.path.join(ORT_DIST, name) for name in ORT_FILES})
    table["/"] = table["/index.html"]
    table["/model.onnx"] = os.path.abspath(model)
    return table


def handler(table):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = table.get(self.path.split("?", 1)[0])
            if path is None:
                self.send_error(404)
                return
            try:
                with open(path, "rb") as f:
                    body = f.read()
            except OSError:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", TYPES.get(os.path.splitext(path)[1], "application/octet-stream"))
            self.send_header("Content-Length", str(len(body)))
            if path == table["/model.onnx"]:  # the page names the model by its own name
                self.send_header("Content-Disposition", f'inline; filename="{os.path.basename(path)}"')
            for key, value in HEADERS.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet: the page says what happens
            pass
    return Handler


def build(model, folder):
    """The page as a static folder: index.html, the scripts, ort/ and model.onnx (and _headers,
    the two isolation headers in the format Netlify and Cloudflare Pages read)."""
    files.check_writable_folder(folder, "--build")
    if os.path.abspath(folder) == os.path.abspath(ROOT):
        raise ValueError(f"--build {folder}: that is the repository; name a new folder")
    os.makedirs(os.path.join(folder, "ort"), exist_ok=True)
    for url, path in routes(model).items():
        if url != "/":
            shutil.copyfile(path, os.path.join(folder, url.lstrip("/")))
    with open(os.path.join(folder, "_headers"), "w") as f:
        f.write("/*\n" + "".join(f"  {k}: {v}\n" for k, v in HEADERS.items() if k.startswith("Cross")))


def parser():
    p = argparse.ArgumentParser(description="Sample an exported DDPM in a web page (onnxruntime-web).")
    p.add_argument("--model", default="ddpm.onnx", help="the model written by export.py (default: ddpm.onnx)")
    p.add_argument("--port", type=int, default=8000, help="port to serve on, 0 for any free one (default: 8000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; other than the loopback address, other machines can open "
                        "the page (default: 127.0.0.1)")
    p.add_argument("--build", metavar="DIR", default=None,
                   help="write the page as a static folder instead of serving it (default: serve)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        check_installed()
        meta = check_model(args.model)
        if args.build:
            build(args.model, args.build)
            messages.say(f"wrote the page to {args.build}/ (serve it with the headers in {args.build}/_headers, "
                         "or without them on one thread)")
            return
        if not 0 <= args.port < 65536:
            raise ValueError(f"--port {args.port}: use 0 to 65535")
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            messages.warn(f"--host {args.host}: other machines that reach this address can open the page and the model")
        try:
            server = http.server.ThreadingHTTPServer((args.host, args.port), handler(routes(args.model)))
        except OSError as e:
            raise ValueError(f"cannot serve on {args.host}:{args.port} ({e.strerror or e}); "
                             "another --port (0: any free one)") from None
    except (ValueError, files.WriteFailed) as e:
        raise SystemExit(f"error: {e}") from None
    host, port = server.server_address[:2]
    kind = f"{meta['num_classes']} classes" if meta["num_classes"] else "unconditional"
    print(f"serving {args.model} ({meta['preset']}, {kind}) on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
