#!/bin/bash
# Capture the LVM reports the parsers are tested on. Runs as root inside the
# test guest (scripts/lvm-vm style; never on a host whose LVM matters):
#   vng ... --rwdir tests/data/lvm --exec 'tests/data/lvm/capture.sh tests/data/lvm'
# It builds a throw-away VG on two loop files, makes one LV of every kind ELV
# uses, writes the JSON reports with the exact field lists csi/backend/lvm
# asks for, and removes everything again.
set -u
out=${1:?output dir}
export LVM_SUPPRESS_FD_WARNINGS=1 LC_ALL=C
modprobe -a loop dm_mod dm_snapshot dm_thin_pool dm_mirror dm_raid raid1 2>/dev/null
CFG='activation{udev_sync=0 udev_rules=0 verify_udev_operations=1 monitoring=0} devices{obtain_device_list_from_udev=0}'
L() { lvm "$@" --config "$CFG"; }
LV_FIELDS=lv_name,vg_name,lv_uuid,lv_size,lv_attr,lv_tags,pool_lv,origin,data_percent,metadata_percent,lv_device_open,lv_kernel_major,lv_kernel_minor,segtype,zero,lv_health_status,copy_percent,lv_metadata_size,chunk_size,lv_time
VG_FIELDS=vg_name,vg_uuid,vg_size,vg_free,vg_extent_size,vg_extent_count,vg_free_count,pv_count,lv_count,vg_tags,vg_attr
REPORT=(--reportformat json --units b --nosuffix)
T=/tmp/elv-capture; mkdir -p $T
truncate -s 512M $T/a.img $T/b.img
A=$(losetup -f --show $T/a.img); B=$(losetup -f --show $T/b.img)
L pvcreate -q "$A" "$B"
L vgcreate -q elvcap "$A" "$B"
t() { local s=$(date +%s.%N); "$@"; local rc=$?; echo "timing $(echo "$(date +%s.%N) - $s" | bc) ${*:2:3} rc=$rc" >&2; }
tags=(--addtag elv.owner=elv.csi.dev --addtag elv.kind=v --addtag elv.name=6e616d65 --addtag elv.size=33554432 --addtag elv.access=mount --addtag elv.fs=ext4)
t L lvcreate -q -y -n elv-v-thick-0123456789abcdef0123456789abcdef -L 33554432b -W y -Z y "${tags[@]}" elvcap
t L lvcreate -q -y -n foreign -L 8m elvcap
t L lvcreate -q -y --type thin-pool -n pool0 -L 128m -Z y elvcap
t L lvcreate -q -y -n elv-v-thin-fedcba9876543210fedcba9876543210 -V 100663296b --thinpool pool0 "${tags[@]}" elvcap
t L lvcreate -q -y -s -n elv-s-thin-00112233445566778899aabbccddeeff --setactivationskip y --addtag elv.owner=elv.csi.dev --addtag elv.kind=s elvcap/elv-v-thin-fedcba9876543210fedcba9876543210
t L lvcreate -q -y -s -n elv-s-thick-00112233445566778899aabbccddeeff -l 50%ORIGIN --addtag elv.owner=elv.csi.dev --addtag elv.kind=s elvcap/elv-v-thick-0123456789abcdef0123456789abcdef
t L lvcreate -q -y -n striped -i 2 -I 64k -L 16m elvcap
t L lvcreate -q -y -n mirrored --type raid1 -m 1 -L 16m --nosync elvcap
t L lvextend -q -L 100m elvcap/elv-v-thin-fedcba9876543210fedcba9876543210
t L lvcreate -q -y -s -n elv-v-thin-clone --setactivationskip n --addtag elv.owner=elv.csi.dev elvcap/elv-s-thin-00112233445566778899aabbccddeeff
t L lvrename -q elvcap elv-v-thin-clone elv-q-thin-clone
t L lvchange -q -an elvcap/foreign
t L lvs "${REPORT[@]}" -o "$LV_FIELDS" elvcap > "$out/lvs-mixed.json"
t L lvs "${REPORT[@]}" -o "$LV_FIELDS,vg_free,vg_size,vg_extent_size" elvcap > "$out/lvs-vgfields.json"
t L vgs "${REPORT[@]}" -o "$VG_FIELDS" elvcap > "$out/vgs.json"
L vgs "${REPORT[@]}" -o "$VG_FIELDS" nosuchvg > "$out/vgs-notfound.json" 2> "$out/vgs-notfound.stderr"; echo "vgs nosuchvg rc=$?" >&2
L lvs "${REPORT[@]}" -o "$LV_FIELDS" elvcap/nosuchlv > "$out/lvs-notfound.json" 2> "$out/lvs-notfound.stderr"; echo "lvs nosuchlv rc=$?" >&2
L lvcreate -q -y -n toobig -L 10g elvcap 2> "$out/lvcreate-nospace.stderr"; echo "lvcreate toobig rc=$?" >&2
L lvcreate -q -y -n foreign -L 8m elvcap 2> "$out/lvcreate-exists.stderr"; echo "lvcreate exists rc=$?" >&2
L lvremove -q -y elvcap/nosuchlv 2> "$out/lvremove-notfound.stderr"; echo "lvremove nosuchlv rc=$?" >&2
# Thin pools in three states (lvs-pools.json): zeroing off (LVM prints zero=""),
# and a small pool with --errorwhenfull y written until it is out of data space.
POOL_FIELDS=$(.venv/bin/python -c 'from csi.backend.lvm.report import LV_FIELDS; print(LV_FIELDS)')
t L lvcreate -q -y --type thin-pool -n nozero -L 16m -Z n elvcap
t L lvcreate -q -y --type thin-pool -n full -L 16m -Z y elvcap
t L lvchange -q --errorwhenfull y elvcap/full   # lvcreate refuses the option for a thin pool
t L lvcreate -q -y -n filler -V 64m --thinpool full elvcap
dd if=/dev/urandom of=/dev/elvcap/filler bs=1M count=24 oflag=direct 2>&1 | tail -1
L lvs "${REPORT[@]}" -o "$POOL_FIELDS" elvcap/nozero elvcap/full elvcap/filler elvcap/pool0 > "$out/lvs-pools.json"
t L lvremove -q -y elvcap
L vgremove -q -y elvcap; L pvremove -q -y "$A" "$B"
losetup -d "$A" "$B"; rm -rf $T
ls -l "$out"
