#!/bin/sh
# knockgate/web entry: pick the document root, then exec BusyBox httpd as PID 1.
#   WEB_ROOT  folder to serve (default /srv/www); when empty or missing, the baked-in
#             default page at /usr/share/knockgate/www is served instead
#   WEB_USER  user httpd drops to after binding port 80 (default www-data; the files must
#             be readable by it; WEB_USER=root serves files only root may read)
set -eu

root=${WEB_ROOT:-/srv/www}
user=${WEB_USER:-www-data}

if [ ! -d "$root" ] || [ -z "$(ls -A "$root" 2>/dev/null)" ]; then
    echo "knockgate-web: $root is empty or missing: serving the default page" >&2
    root=/usr/share/knockgate/www
fi

# -f: foreground; -v: one log line per request on stderr (docker logs); -c: no config file,
# so a stray /etc/httpd.conf or one inside the served folder never changes behaviour.
exec busybox httpd -f -v -p 80 -u "$user" -h "$root" -c /dev/null "$@"
