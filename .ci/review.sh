#!/usr/bin/env bash
# The pull-request review, every step: .github/workflows/review.yml runs only this, and a test runs it here.
#
#   BASE=origin/main .ci/review.sh              # posts reports/review.md as the PR's comment, updated on each push
#   DRY_RUN=1 BASE=main .ci/review.sh           # or no REPO_TOKEN: the comment is written to $COMMENT_FILE instead
#
# BASE           the baseline: a branch, tag or commit this clone has (default origin/main; CI fetches it)
# DVC_REMOTE_URL the DVC remote holding the outs (a repository secret; cloud credentials ride in their usual
#                variables, e.g. AWS_ACCESS_KEY_ID); unset: the default remote in .dvc/config
# REPO_TOKEN     the token CML posts with; unset means a dry run
# COMMENT_FILE   where a dry run writes the comment (default reports/review-comment.md)
set -euo pipefail

BASE=${BASE:-origin/main}
COMMENT_FILE=${COMMENT_FILE:-reports/review-comment.md}
TITLE="alpaca-qlora review"  # CML's hidden marker: the next push updates this comment instead of adding one
PULLED=data/predictions/finetuned.jsonl
PULL_LOG=reports/dvc-pull.log

# What the run cannot do without (the baseline commit, the DVC remote) fails here, as one line saying what to set.
fail() {
    echo "review.sh: $*" >&2
    exit 2
}

if ! git rev-parse --verify --quiet "$BASE^{commit}" >/dev/null; then
    remotes=$(git remote | paste -sd, - | grep . || echo none)
    fail "BASE=$BASE is not a commit in this clone (its git remotes: $remotes); set BASE to the baseline's branch" \
        "or commit and fetch it first (git fetch origin main, or actions/checkout with fetch-depth: 0)."
fi

# Setup: the venv, unless the package already imports (a cached venv, or a test's interpreter).
if ! python -c "import alpaca_qlora" 2>/dev/null; then
    make setup
    export PATH="$PWD/.venv/bin:$PATH"
fi

# The outs: only the predictions are cached outs (metrics, timing and dvc.lock are in git); the base revision's
# predictions are fetched by the review itself, through DVC, from the same remote.
remote=$(dvc config core.remote 2>/dev/null || true)
if [[ -n "${DVC_REMOTE_URL:-}" && -n "$remote" ]]; then
    dvc remote modify --local "$remote" url "$DVC_REMOTE_URL"
elif [[ -n "${DVC_REMOTE_URL:-}" ]]; then
    remote=ci
    dvc remote add --local --default "$remote" "$DVC_REMOTE_URL"
elif [[ -z "$remote" ]]; then
    fail "no DVC remote: set DVC_REMOTE_URL to the remote that holds the outs (or give .dvc/config a default remote)."
fi
mkdir -p "$(dirname "$PULL_LOG")"
if ! dvc pull "$PULLED" >"$PULL_LOG" 2>&1; then
    url=$(dvc config "remote.$remote.url" 2>/dev/null || true)  # not `dvc remote list`: it wraps long URLs
    fail "cannot pull $PULLED from the DVC remote '$remote' ($url); set DVC_REMOTE_URL (and its credentials) to" \
        "the remote this branch's outs were pushed to. DVC's output: $PULL_LOG"
fi

# The review; a refusal (runs that cannot be compared) still writes the file that says why, and is posted. An
# older review.md must not stand in for one this run did not write.
rm -f reports/review.md
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
