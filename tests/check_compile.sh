#!/bin/sh
# The compile matrix of esft.h: C99 and C11 pedantic, C++ with the header included
# twice, an ESFT_STATIC unit, only esft_ symbols exported, esft_cuda.cu with nvcc.
CC=${CC:-cc}; CXX=${CXX:-c++}; BUILD=${BUILD:-build}
out=$BUILD/compile; mkdir -p "$out"
passed=0; failed=0; skipped=0
ok()   { echo "PASS $1"; passed=$((passed + 1)); }
bad()  { echo "FAIL $1"; sed 's/^/     /' "$out/err" | head -20; failed=$((failed + 1)); }
skip() { echo "SKIP $1: $2"; skipped=$((skipped + 1)); }

cat > "$out/impl.c" <<'C'
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"
#include "esft.h"
int main(void) { return esft_version()[0] == 0; }
C
for std in c99 c11; do
    if $CC -std=$std -Wall -Wextra -pedantic -Werror -I. "$out/impl.c" -o "$out/impl_$std" -lm 2>"$out/err"; then
        ok "compile_$std"; else bad "compile_$std"; fi
done
cp "$out/impl.c" "$out/impl.cpp"
if $CXX -std=c++11 -Wall -Wextra -pedantic -Werror -I. "$out/impl.cpp" -o "$out/impl_cxx" 2>"$out/err"; then
    ok compile_cxx11_included_twice; else bad compile_cxx11_included_twice; fi

printf '#define ESFT_STATIC\n#define ESFT_IMPLEMENTATION\n#include "esft.h"\nint main(void){ return esft_version()[0] == 0; }\n' > "$out/static.c"
if $CC -std=c99 -Wall -Wextra -pedantic -Werror -Wno-unused-function -I. "$out/static.c" -o "$out/static" -lm 2>"$out/err"; then
    ok compile_esft_static; else bad compile_esft_static; fi

printf '#define ESFT_IMPLEMENTATION\n#include "esft.h"\n' > "$out/lib.c"
if $CC -std=c99 -O1 -I. -c "$out/lib.c" -o "$out/lib.o" 2>"$out/err"; then
    leaked=$(nm -g --defined-only "$out/lib.o" | awk '{print $3}' | grep -v '^esft_' || true)
    if [ -z "$leaked" ]; then ok exports_only_esft_symbols
    else echo "$leaked" > "$out/err"; bad exports_only_esft_symbols; fi
else bad exports_only_esft_symbols; fi

printf '#define ESFT_MALLOC(n) malloc(n)\n#include <stdlib.h>\n#define ESFT_IMPLEMENTATION\n#include "esft.h"\n' > "$out/partial.c"
if $CC -std=c99 -I. -c "$out/partial.c" -o "$out/partial.o" 2>"$out/err"; then
    echo "compiled although only ESFT_MALLOC was defined" > "$out/err"; bad allocator_all_or_none
else grep -q "all or none" "$out/err" && ok allocator_all_or_none || bad allocator_all_or_none; fi

# Vendored: every example compiles in a folder holding only it and a copy of
# esft.h (one include style, "esft.h" found beside the file or through -I.).
vend=$out/vendored; rm -rf "$vend"; mkdir -p "$vend"; cp esft.h "$vend/"
for ex in examples/*.c; do
    name=$(basename "$ex" .c)
    cp "$ex" "$vend/"
    if (cd "$vend" && $CC -std=c99 -O0 -fsyntax-only "$name.c") 2>"$out/err"; then ok "vendored_example_$name"
    else bad "vendored_example_$name"; fi
done
bad_style=$(grep -ln '#include "\.\./' examples/*.c examples/*.cu bench/*.c tests/*.c 2>/dev/null)
if [ -z "$bad_style" ]; then ok one_include_style
else echo "$bad_style: include \"esft.h\" with -I., not a relative path" > "$out/err"; bad one_include_style; fi

# The MoE workspace has one owner: esft.h publishes its regions
# (esft_moe_workspace_view_at) and esft_cuda.cu takes them from there, carving
# nothing of its own (it once mirrored the layout by hand).
if [ -f esft_cuda.cu ]; then
    if grep -q 'esft_moe_workspace_view_at(' esft_cuda.cu && ! grep -qiE 'carve\(|ESFT__MOE_WS|ws_layout' esft_cuda.cu
    then ok moe_workspace_layout_has_one_owner
    else echo "esft_cuda.cu lays out the MoE workspace itself" > "$out/err"; bad moe_workspace_layout_has_one_owner; fi
fi

# The same for the PESC layer's scratch (saved->work): esft.h publishes it
# (esft_pesc_work_view_at); esft_cuda.cu neither sizes nor splits it.
if [ -f esft_cuda.cu ]; then
    if grep -q 'esft_pesc_work_view_at(' esft_cuda.cu && ! grep -qE 'pesc_work_split|pesc_work_floats|(\.|->)(yg|dlogits|coef) = ' esft_cuda.cu
    then ok pesc_work_layout_has_one_owner
    else echo "esft_cuda.cu lays out the PESC scratch itself" > "$out/err"; bad pesc_work_layout_has_one_owner; fi
fi

if [ -f esft_cuda.cu ]; then
    if [ -n "$NVCC" ]; then
        if $NVCC -std=c++17 -I. -c esft_cuda.cu -o "$out/esft_cuda.o" 2>"$out/err"; then ok nvcc_compiles_esft_cuda
        else bad nvcc_compiles_esft_cuda; fi
    else skip nvcc_compiles_esft_cuda "nvcc not found"; fi
fi
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
