#!/usr/bin/env bash
# Builds snapshotd in release mode and installs it as a systemd service.
# Usage: sudo deploy/install.sh [--prefix /usr/local]
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=/usr/local
if [ "${1:-}" = "--prefix" ]; then prefix="$2"; fi

bash deploy/install-build-deps.sh
swift build -c release --product snapshotd
swift build -c release --product snapshotctl
install -m 0755 .build/release/snapshotd .build/release/snapshotctl "$prefix/bin/"
# The service runs as its own user; trainers join group snapshotd to reach its socket.
if ! getent passwd snapshotd >/dev/null; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin --user-group snapshotd
fi
install -m 0644 deploy/snapshotd.tmpfiles /etc/tmpfiles.d/snapshotd.conf
systemd-tmpfiles --create /etc/tmpfiles.d/snapshotd.conf
install -d -m 0755 /etc/snapshotd "$prefix/share/doc/snapshotd"
install -m 0644 README.md CHANGELOG.md "$prefix/share/doc/snapshotd/"
install -d -m 0755 "$prefix/share/doc/snapshotd/docs" "$prefix/share/doc/snapshotd/docs/decisions"
install -m 0644 docs/*.md docs/*.svg "$prefix/share/doc/snapshotd/docs/"
install -m 0644 docs/decisions/*.md "$prefix/share/doc/snapshotd/docs/decisions/"
if [ ! -f /etc/snapshotd/snapshotd.toml ]; then install -m 0644 deploy/snapshotd.toml /etc/snapshotd/; fi
# Two secrets: one for trainers and operators, one for peers (cluster mode).
# Copy both to every node of the cluster.
for name in secret peer-secret; do
    if [ ! -f "/etc/snapshotd/$name" ]; then
        head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "/etc/snapshotd/$name"
        chmod 0640 "/etc/snapshotd/$name"
        chown root:snapshotd "/etc/snapshotd/$name"
    fi
done
sed "s#/usr/local/bin#$prefix/bin#" deploy/snapshotd.service > /etc/systemd/system/snapshotd.service
systemd-analyze verify /etc/systemd/system/snapshotd.service
systemctl daemon-reload
echo "installed; start with: systemctl enable --now snapshotd"
