#!/bin/bash
set -e
cd /tmp/loop7
. /work/venv/bin/activate
uptime > log.txt
/usr/bin/time -f "%e s wall" tiersim calibrate --device cpu --repeat 2 --out cpu.toml > cal.txt 2>&1
uptime >> log.txt
for i in 1 2 3; do
  /usr/bin/time -f "%e s wall" tiersim validate --suite --device cpu --hardware cpu.toml --out run$i > run$i.txt 2>&1
  uptime >> log.txt
done
echo done >> log.txt
