#!/usr/bin/env bash
# The pull-request review, every step: .github/workflows/review.yml runs only this, and a test runs it here.
#
#   BASE=origin/main .ci/review.sh              # posts reports/review.md as the PR's comment, updated on each push
#   DRY_RUN=1 BASE=main .ci/review.sh           # or no REPO_TOKEN: the comment is written to $COMMENT_FILE instead
#
# BASE           the baseline revision (default origin/main)
# DVC_REMOTE_URL the DVC remote holding the outs (a repository secret; cloud credentials ride in their usual
#                variables, e.g. AWS_ACCESS_KEY_ID); unset: the remote in .dvc/config
# REPO_TOKEN     the token CML posts with; unset means a dry run
# COMMENT_FILE   where a dry run writes the comment (default reports/review-comment.md)
set -euo pipefail

BASE=${BASE:-origin/main}
COMMENT_FILE=${COMMENT_FILE:-reports/review-comment.md}
TITLE="alpaca-qlora review"  # CML's hidden marker: the next push updates this comment instead of adding one

# Setup: the venv, unless the package already imports (a cached venv, or a test's interpreter).
if ! python -c "import alpaca_qlora" 2>/dev/null; then
    make setup
    export PATH="$PWD/.venv/bin:$PATH"
fi

# The outs: only the predictions are cached outs (metrics, timing and dvc.lock are in git); the base revision's
# predictions are fetched by the review itself, through DVC, from the same remote.
if [[ -n "${DVC_REMOTE_URL:-}" ]]; then
    dvc remote modify --local "$(dvc config core.remote)" url "$DVC_REMOTE_URL"
fi
dvc pull data/predictions/finetuned.jsonl

# The review; a refusal (runs that cannot be compared) still writes the file that says why, and is posted.
status=0
python -m alpaca_qlora.evaluation.review "$BASE" || status=$?
[[ -f reports/review.md ]] || exit "$status"

if [[ -n "${DRY_RUN:-}" || -z "${REPO_TOKEN:-}" ]]; then
    mkdir -p "$(dirname "$COMMENT_FILE")"
    cp reports/review.md "$COMMENT_FILE"
    echo "dry run: would run cml comment update --target=pr --watermark-title=\"$TITLE\" reports/review.md;" \
        "the comment is in $COMMENT_FILE" >&2
else
    cml comment update --target=pr --watermark-title="$TITLE" reports/review.md
fi
exit "$status"
