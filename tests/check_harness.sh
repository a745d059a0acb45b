#!/bin/sh
# The verdicts of our test harness (tests/harness.h), through
# tests/selftest_harness.c, a program whose tests are meant to fail: a SKIP after
# a failed check is a FAIL, the first failure is the one reported (and repeated
# before the closing line), registering past HARNESS_MAX_TESTS or a name filter
# that matches nothing fails the run, and the exit status counts the failures.
# Run by tests/run_all.sh with BUILD and CC set.
CC=${CC:-cc}; BUILD=${BUILD:-build}
out=$BUILD/check_harness; mkdir -p "$out"
passed=0; failed=0; skipped=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; sed 's/^/     /' "$out/out" 2>/dev/null | head -12; failed=$((failed + 1)); }

# run NAME PROGRAM [FILTER]: runs it into $out/out, its exit status in $rc
run() { "$2" ${3:+"$3"} > "$out/out" 2>&1; rc=$?; }
has() { grep -qF -- "$1" "$out/out"; }
last() { [ "$(tail -n 1 "$out/out")" = "$1" ]; }

if ! $CC -std=c99 -Wall -Wextra -pedantic -Werror -Itests tests/selftest_harness.c -o "$out/self" -lm 2>"$out/out"; then
    fail build "selftest_harness.c does not compile"; echo "$passed passed, $failed failed, $skipped skipped"; exit 1
fi

run x "$out/self" good
if [ $rc -eq 0 ] && has "PASS good" && last "1 passed, 0 failed, 0 skipped" && ! has "first failure"; then
    pass passing_test_exits_0; else fail passing_test_exits_0 "exit $rc"; fi

run x "$out/self" skipped_plainly
if [ $rc -eq 0 ] && has "SKIP skipped_plainly: the reason of the skip" && last "0 passed, 0 failed, 1 skipped"; then
    pass skip_reports_its_reason; else fail skip_reports_its_reason "exit $rc"; fi

run x "$out/self" fails_then_skips
if [ $rc -eq 1 ] && has "FAIL fails_then_skips" && ! has "SKIP fails_then_skips" && has "helper check 1 failed" \
    && has "then asked to skip: a skip after a failure" && last "0 passed, 1 failed, 0 skipped"; then
    pass skip_after_failure_is_fail; else fail skip_after_failure_is_fail "exit $rc"; fi

run x "$out/self" fails_twice
if [ $rc -eq 1 ] && has "helper check 1 failed" && ! has "helper check 2 failed" \
    && has "first failure: fails_twice: tests/selftest_harness.c:" && last "0 passed, 1 failed, 0 skipped"; then
    pass first_failure_is_reported; else fail first_failure_is_reported "exit $rc"; fi

run x "$out/self" fails_then_passes
if [ $rc -eq 1 ] && has "FAIL fails_then_passes" && last "0 passed, 1 failed, 0 skipped"; then
    pass later_pass_keeps_failure; else fail later_pass_keeps_failure "exit $rc"; fi

run x "$out/self"
if [ $rc -eq 3 ] && last "1 passed, 3 failed, 1 skipped" && has "first failure: fails_then_skips:"; then
    pass exit_status_counts_failures; else fail exit_status_counts_failures "exit $rc"; fi

run x "$out/self" no_such_test
if [ $rc -ne 0 ] && has "no test name contains 'no_such_test'" && last "0 passed, 1 failed, 0 skipped"; then
    pass unmatched_filter_fails; else fail unmatched_filter_fails "exit $rc"; fi

if $CC -std=c99 -DHARNESS_MAX_TESTS=2 -Itests tests/selftest_harness.c -o "$out/self_small" -lm 2>"$out/out"; then
    run x "$out/self_small" good
    if [ $rc -ne 0 ] && has "FAIL harness: 5 tests registered, over HARNESS_MAX_TESTS (2): 3 not run" \
        && last "1 passed, 1 failed, 0 skipped"; then
        pass over_the_test_limit_fails; else fail over_the_test_limit_fails "exit $rc"; fi
else fail over_the_test_limit_fails "build with -DHARNESS_MAX_TESTS=2 failed"; fi

# tests/run_all.sh lists every skip with its reason before the closing line.
# Run from an empty folder, it finds only the fake suite in BUILD/tests.
root=$(pwd); abs=$(cd "$out" && pwd)
rm -rf "$out/fake" "$out/empty"; mkdir -p "$out/fake/tests" "$out/empty"
printf '#!/bin/sh\necho "PASS one"\necho "SKIP two: no device here"\necho "1 passed, 0 failed, 1 skipped"\n' > "$out/fake/tests/test_fake"
chmod +x "$out/fake/tests/test_fake"
(cd "$out/empty" && BUILD="$abs/fake" sh "$root/tests/run_all.sh") > "$out/out" 2>&1; rc=$?
if [ $rc -eq 0 ] && has "test_fake/two: no device here" && last "1 passed, 0 failed, 1 skipped"; then
    pass run_all_lists_skip_reasons; else fail run_all_lists_skip_reasons "exit $rc"; fi

echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
