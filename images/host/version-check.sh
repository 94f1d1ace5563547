#!/bin/bash
# Simple script to list version numbers of critical development tools
# (Linux From Scratch 11.3, chapter 2.2 "Host System Requirements").
export LC_ALL=C
bash --version | head -n1 | cut -d" " -f2-4
MYSH=$(readlink -f /bin/sh)
echo "/bin/sh -> $MYSH"
echo $MYSH | grep -q bash || echo "ERROR: /bin/sh does not point to bash"
unset MYSH

echo -n "Binutils: "; ld --version | head -n1 | cut -d" " -f3-
bison --version | head -n1

if [ -h /usr/bin/yacc ]; then
  echo "/usr/bin/yacc -> `readlink -f /usr/bin/yacc`";
elif [ -x /usr/bin/yacc ]; then
  echo yacc is `/usr/bin/yacc --version | head -n1`
else
  echo "yacc not found"
fi

echo -n "Coreutils: "; chown --version | head -n1 | cut -d")" -f2
diff --version | head -n1
find --version | head -n1
gawk --version | head -n1

if [ -h /usr/bin/awk ]; then
  echo "/usr/bin/awk -> `readlink -f /usr/bin/awk`";
elif [ -x /usr/bin/awk ]; then
  echo awk is `/usr/bin/awk --version | head -n1`
else
  echo "awk not found"
fi

gcc --version | head -n1
g++ --version | head -n1
grep --version | head -n1
gzip --version | head -n1
cat /proc/version
m4 --version | head -n1
make --version | head -n1
patch --version | head -n1
echo Perl `perl -V:version`
python3 --version
sed --version | head -n1
tar --version | head -n1
makeinfo --version | head -n1  # texinfo version
xz --version | head -n1

echo 'int main(){}' > dummy.c && g++ -o dummy dummy.c
if [ -x dummy ]
  then echo "g++ compilation OK";
  else echo "g++ compilation failed"; fi
rm -f dummy.c dummy

# ---------------------------------------------------------------------------
# lfsorch addition. The book's script above only prints, for a human to read;
# an image build needs a verdict, so the same requirements are checked again
# here and the script exits non-zero when any is unmet. The dummy program is
# compiled in a scratch directory because the book's version writes to $PWD.
# ---------------------------------------------------------------------------
problems=0
fail() { echo "ERROR: $*" >&2; problems=$((problems + 1)); }

for tool in bash ld bison chown diff find gawk gcc g++ grep gzip m4 make patch \
            perl python3 sed tar makeinfo xz; do
  command -v "$tool" >/dev/null 2>&1 || fail "$tool not found"
done
readlink -f /bin/sh | grep -q bash || fail "/bin/sh does not point to bash"
readlink -f /usr/bin/awk | grep -q gawk || fail "/usr/bin/awk does not point to gawk"
[ -e /usr/bin/yacc ] || fail "/usr/bin/yacc not found (should run bison)"

scratch=$(mktemp -d)
echo 'int main(){}' > "$scratch/dummy.cpp"
g++ -o "$scratch/dummy" "$scratch/dummy.cpp" && "$scratch/dummy" || fail "g++ cannot build a program"
rm -rf "$scratch"

if [ "$problems" -ne 0 ]; then
  echo "host check: $problems requirement(s) not met" >&2
  exit 1
fi
echo "host check: all LFS 11.3 host requirements met"
