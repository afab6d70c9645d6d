# Sourced (not run) by the device scripts (experiments/device_run.sh, scripts/device_studies.sh) from the repository
# root with PY set: names the commit (OLLM_GIT_SHA: the GPU box's tree travels without .git) and installs every
# carried `.whl*/` wheel into /tmp/site with --no-index (hydra-core, omegaconf, antlr4, ...; ../shared/DEVICE.md).
if [ -z "${OLLM_GIT_SHA:-}" ]; then
  OLLM_GIT_SHA="$(git rev-parse --short HEAD 2>/dev/null || true)"
  [ -n "$OLLM_GIT_SHA" ] || echo "warning: no .git and no OLLM_GIT_SHA: the results will not name the commit" >&2
fi
export OLLM_GIT_SHA

wheels=(.whl*/*.whl)
if [ -e "${wheels[0]}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${wheels[@]}" || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
