# Sourced by ./deploy and ./run-tests: makes .venv hold exactly what pyproject.toml pins,
# with the test tools, the device transports (asyncssh, adbutils, pyserial, labgrid) and the toolchains of the arm
# target (ncnn, pnnx) and the stm32 target (TensorFlow, onnx2tf, TFLite Micro, LiteRT).
# Re-installs only when pyproject.toml changed since the last install.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.pyproject.sha256"
wanted="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    python=""
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
            python="$candidate"
            break
        fi
    done
    if [ -z "$python" ]; then
        echo "error: edge-deploy needs Python 3.11 (torch 2.14.1 wheels are pinned for it)" >&2
        exit 2
    fi
    echo "setting up $venv (first run takes a few minutes: PyTorch is large)..." >&2
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -qq --disable-pip-version-check -e "$root[test,arm,remote,adb,serial,lab,stm32,search]" >&2
    # Their own pins would replace TensorFlow and numpy pinned above; the stm32 extra supplies what they need.
    "$venv/bin/python" -m pip install -qq --disable-pip-version-check --no-deps tf-keras==2.21.0 onnx2tf==1.29.24 >&2
    echo "$wanted" > "$stamp"
fi
