/* selftest_harness.c - a test program that is meant to fail: tests/check_harness.sh
   builds it, runs one scenario at a time (the harness's name filter) and checks
   the verdict, the exit status and the report. Not a test_*.c, so `make test`
   does not run it as a suite. Build with -DHARNESS_MAX_TESTS=2 to register past
   the harness's limit. */
#include "harness.h"

/* A helper's failed check returns from the helper only; the test goes on. */
static void helper_fails(int line_tag)
{
    CHECK_MSG(line_tag == 0, "helper check %d failed", line_tag);
}

TEST(good) { CHECK(1 + 1 == 2); }

TEST(skipped_plainly) { SKIP("the reason of the skip"); }

TEST(fails_then_skips)
{
    helper_fails(1);
    SKIP("a skip after a failure");
}

TEST(fails_twice)
{
    helper_fails(1);
    helper_fails(2);
}

TEST(fails_then_passes)
{
    helper_fails(3);
    CHECK(1);
}

HARNESS_MAIN()
