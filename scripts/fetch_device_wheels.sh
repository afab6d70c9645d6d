#!/usr/bin/env bash
# Download wandb and everything it imports, as Python 3.12 manylinux x86_64 wheels, into .whl/ (git-ignored), so the
# GPU box (no network, no wandb) can run the studies with logger.mode=offline:
#
#   bash scripts/fetch_device_wheels.sh            # here, once; then carry `.whl` in the device call
#   bash scripts/device_studies.sh memory throughput   # there: installs .whl*/ into /tmp/site, runs W&B offline
#   python scripts/check_wandb.py <unpacked sweep>     # here: the offline runs against results.load
#
# WANDB_VERSION (default 0.16.6). Why that old one: the working tree (60 MB with the long-context model) and what is
# carried must stay under the device tool's 64 MiB, and wandb >= 0.17 ships its 9-20 MB wandb-core binary (0.31 with
# its dependencies: 27 MB). 0.16.6 is 2.2 MB of pure Python (~6 MB with its dependencies) and writes the same offline
# `.wandb` records: a smoke sweep of `+experiment=throughput` logged through it here passes check_wandb.py (read
# with this machine's wandb 0.31 classes) for every job. It predates NumPy 2, so experiments/device_env.sh adds
# NumPy's removed aliases (np.float_ ...) through a sitecustomize when it installs a wandb older than 0.17.
# The wheels resolve with their dependencies (pip download resolves for the target platform, not this machine);
# packages the device image already has (requests, pyyaml, protobuf, ...) travel too, so nothing depends on the
# image's versions. hydra-core, omegaconf and antlr4 are not fetched here (the lead's .whl*/ folders already carry
# them); two versions of one package in .whl*/ stop the install, so the versions already there constrain the
# download and the script refuses to leave duplicates.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
version="${WANDB_VERSION:-0.16.6}"
mkdir -p .whl
# .gitignore lists /.whl/; a checkout without it keeps the wheels out of git through its local exclude file
if [ -d .git ] && ! git check-ignore -q .whl/x.whl; then echo '/.whl/' >> .git/info/exclude; fi

# the wheels already in .whl*/ (hydra, the server's fastapi and pydantic, ...) pin their versions, so what wandb needs
# resolves to them where it can instead of adding a second version
pins=$(mktemp)
for f in .whl*/*.whl; do
  [ -e "$f" ] && basename "$f" | awk -F- '{print $1 "==" $2}'
done > "$pins"
"$PY" -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -c "$pins" -d .whl "wandb==$version"
rm -f "$pins"

# one version per distribution across every .whl*/ folder (device_run.sh and device_studies.sh install them all)
dupes=$(for f in .whl*/*.whl; do basename "$f" | cut -d- -f1 | tr 'A-Z_.' 'a-z--'; done | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "more than one wheel of: $dupes; keep one version of each in .whl*/ (the device install stops otherwise)" >&2
  exit 1
fi
ls .whl/*.whl | wc -l | xargs echo "wheels in .whl/:"
du -sh .whl
