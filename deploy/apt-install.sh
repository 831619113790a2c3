#!/usr/bin/env bash
# Installs the Debian packages a script of Realm's is missing: `deploy/apt-install.sh WHO PACKAGE...`
# (WHO names the script in the messages). As root it installs them; otherwise it says what to
# install and fails. With no package it does nothing.
set -euo pipefail
who=$1
shift
(($#)) || exit 0
if ((EUID != 0)); then
    echo "$who: needs $*: run as root, or install them (apt-get install $*)" >&2
    exit 1
fi
echo "$who: installing $*" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
