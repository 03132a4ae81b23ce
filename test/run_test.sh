#!/usr/bin/env bash
# Local validation run: predict the bundled real cases as the container does, score them,
# compare the figures with the recorded floors, then run the test suite.
#
#   bash test/run_test.sh
#
# With a working Docker engine it builds the image and runs it with --network none, as
# -u 1000:1000 and with a read-only input mount. Without one it runs the same command,
# `python process.py` with no arguments, in a local folder of the same layout.
# Uses the `python` on PATH (activate the virtual environment first). Exits non-zero on
# the first failure.
set -euo pipefail

repository="$(cd "$(dirname "$0")/.." && pwd)"
cases="$repository/test/data/focus12"
floors="$cases/floors.json"
work="$(mktemp -d "${TMPDIR:-/tmp}/fetuskit-run-test.XXXXXX")"
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

echo "== 1. predict the bundled cases in $work/ws"
mkdir -p "$work/ws/data" "$work/ws/output"
cp -r "$cases/images" "$work/ws/data/images"
python - "$cases/list.json" "$work/ws/data/valid.json" <<'EOF'
import json
import sys

# The organisers' inference list contains image paths only.
entries = json.load(open(sys.argv[1]))
json.dump([{"image": entry["image"]} for entry in entries], open(sys.argv[2], "w"), indent=1)
EOF
chmod -R a-w "$work/ws/data"

if docker info >/dev/null 2>&1; then
    echo "Docker engine found: building and running the image"
    docker build -t fetuskit-run-test "$repository"
    chmod 0777 "$work/ws/output"
    gpus=()
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus=(--gpus all)
    fi
    docker run --rm "${gpus[@]}" --network none -u 1000:1000 \
        -v "$work/ws/data:/ws/data:ro" -v "$work/ws/output:/ws/output" fetuskit-run-test
else
    echo "no Docker engine (docker info failed): running process.py locally in the same layout"
    (cd "$work/ws" && python "$repository/process.py")
fi

echo "== 2. score the predictions"
ms_per_image="$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["mean_ms_per_image"])' \
    "$work/ws/output/run_report.json")"
(cd "$repository" && python -m evaluation --pred-dir "$work/ws/output" --out "$work/scores" \
    --json "$cases/list.json" --ms-per-image "$ms_per_image")

echo "== 3. compare with the recorded floors"
if [[ -f "$floors" ]]; then
    python - "$work/scores/summary.json" "$floors" <<'EOF'
import json
import sys

summary = json.load(open(sys.argv[1]))
floors = json.load(open(sys.argv[2]))
failed = []
for key, floor in floors.items():
    if key.startswith("_"):
        continue
    value = summary.get(key)
    status = "ok" if value is not None and value >= floor else "BELOW FLOOR"
    print(f"{key}: {value} (floor {floor}) {status}")
    if status != "ok":
        failed.append(key)
if failed:
    sys.exit(f"figures below their floors in {sys.argv[2]}: {', '.join(failed)}")
EOF
else
    echo "floors missing: $floors does not exist, so the floor check is skipped"
fi

echo "== 4. test suite"
(cd "$repository" && python -m pytest -q)
