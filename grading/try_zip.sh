#!/usr/bin/env bash
# Try the autograder zip the way Gradescope runs it, in a fresh Ubuntu 22.04, before uploading it:
#
#     python grading/package.py
#     sudo bash grading/try_zip.sh grading/autograder.zip SUBMISSION_DIR [RESULTS_JSON]
#
# It needs root, debootstrap and the network. It builds Ubuntu 22.04's minimal root file system
# with debootstrap (kept in $HW5_ROOTFS, default /tmp/hw5-ubuntu-22.04, so that the next try
# reuses it; delete it to start over), unpacks the zip into its /autograder/source and runs
# setup.sh there, as Gradescope does when it builds the image (again only when setup.sh or
# requirements.txt differ from the last try's); then, as for each
# submission, copies run_autograder to /autograder and SUBMISSION_DIR's files to
# /autograder/submission, runs it, and copies results.json to RESULTS_JSON (default:
# ./results.json). Like Gradescope's, the environment inside starts empty, but for TORCH_INDEX,
# which setup.sh reads, and PIP_CERT, a CA bundle for pip behind a proxy that signs its own
# certificates. Mounts live in a mount namespace of their own, and end with it.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 ZIP SUBMISSION_DIR [RESULTS_JSON]" >&2
    exit 2
fi
zip=$(realpath "$1")
submission=$(realpath "$2")
out=$(realpath -m "${3:-results.json}")
rootfs=${HW5_ROOTFS:-/tmp/hw5-ubuntu-22.04}
if [ ! -d "$rootfs/usr" ]; then
    debootstrap --variant=minbase --components=main,universe jammy "$rootfs" \
        http://archive.ubuntu.com/ubuntu
fi
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
inside=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
        LANG=C.UTF-8 TORCH_INDEX="${TORCH_INDEX:-}")
if [ -n "${PIP_CERT:-}" ]; then
    cp "$PIP_CERT" "$rootfs/etc/hw5-pip-ca.crt"
    inside+=(PIP_CERT=/etc/hw5-pip-ca.crt)
fi
rm -rf "$rootfs/autograder"
mkdir -p "$rootfs/autograder/source" "$rootfs/autograder/submission"
python3 -m zipfile -e "$zip" "$rootfs/autograder/source"
chmod +x "$rootfs/autograder/source/setup.sh" "$rootfs/autograder/source/run_autograder"
cp -r "$submission"/. "$rootfs/autograder/submission/"
cp "$rootfs/autograder/source/run_autograder" "$rootfs/autograder/run_autograder"
unshare --mount --propagation private bash -s "$rootfs" "${inside[@]}" <<'INSIDE'
set -euo pipefail
rootfs=$1
shift
mount -t proc proc "$rootfs/proc"
mount --rbind /sys "$rootfs/sys"
mount --rbind /dev "$rootfs/dev"
# setup.sh once per setup.sh and requirements.txt, as Gradescope builds an image once per zip
stamp=$(cat "$rootfs/autograder/source/setup.sh" "$rootfs/autograder/source/requirements.txt" | sha256sum)
if [ "$(cat "$rootfs/opt/hw5/.setup" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$rootfs/opt/hw5"
    "$@" chroot "$rootfs" bash -c 'cd /autograder/source && ./setup.sh'
    echo "$stamp" > "$rootfs/opt/hw5/.setup"
fi
"$@" chroot "$rootfs" /autograder/run_autograder
INSIDE
cp "$rootfs/autograder/results/results.json" "$out"
echo "wrote $out"
