# Sourced (not run) by the device scripts (experiments/device_run.sh, scripts/device_studies.sh) from the repository
# root with PY set: names the commit (OLLM_GIT_SHA: the GPU box's tree travels without .git) and installs every
# carried `.whl*/` wheel into /tmp/site with --no-index (hydra-core, omegaconf, antlr4, ...; ../shared/DEVICE.md).
# Pass OLLM_GIT_SHA on the device tool's box: its tree travels without .git, yet `git rev-parse` there answered with
# the session's first commit for trees of later ones (2026-12-07, experiments/raw/2026-12-07f-h100/MANIFEST.md).
if [ -z "${OLLM_GIT_SHA:-}" ]; then
  OLLM_GIT_SHA="$(git rev-parse --short HEAD 2>/dev/null || true)"
  [ -n "$OLLM_GIT_SHA" ] || echo "warning: no .git and no OLLM_GIT_SHA: the results will not name the commit" >&2
fi
export OLLM_GIT_SHA

wheels=(.whl*/*.whl)
if [ -e "${wheels[0]}" ]; then
  # once per set of wheels: a second script started beside a running one (device_run.sh's steps run at once in one
  # call) must not rewrite the site its neighbour is importing from
  if [ "$(cat /tmp/site/.carried 2>/dev/null)" != "${wheels[*]}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "${wheels[@]}" || exit 1
    echo "${wheels[*]}" > /tmp/site/.carried
  fi
  # wandb < 0.17 (the 2 MB pure-Python one scripts/fetch_device_wheels.sh fetches) reads NumPy aliases that NumPy 2
  # removed: put them back for these runs only, through the carried site's sitecustomize. It also hides the box's
  # tensorboard: wandb's internal process imports it when present, and its protos need protobuf >= 5.26 where
  # wandb 0.16 carries 4.25 (the W&B service then died at `wandb.init` with "MailboxError: transport failed")
  if compgen -G "/tmp/site/wandb-0.1[0-6].*.dist-info" > /dev/null; then
    cat > /tmp/site/sitecustomize.py <<'PYEOF'
import sys as _sys
_sys.modules.setdefault("tensorboard", None)
import numpy as _np
for _old, _new in (("float_", "float64"), ("complex_", "complex128"), ("unicode_", "str_"), ("string_", "bytes_")):
    if not hasattr(_np, _old):
        setattr(_np, _old, getattr(_np, _new))
PYEOF
  fi
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
