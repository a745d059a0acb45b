/* harness.h - the esft test harness: self-registering named tests, checks that
   report file:line, SKIP with a reason, and a closing "N passed, N failed, N skipped".

   Usage, in exactly one .c file per test program:

       #include "harness.h"
       TEST(routing_ties_go_to_lower_id) {
           CHECK(x == 1);
           CHECK_EQ_INT(ids[0], 3);
           CHECK_NEAR(y, 0.5, 1e-6);
           if (!have_gpu) SKIP("no CUDA device");
       }
       HARNESS_MAIN()

   A test stops at its first failed check (the rest would only add noise). A
   check that fails inside a helper returns from the helper only, so the test
   may go on: the first failure's message is the one reported, and a SKIP after
   a failure leaves the test FAILed (a skip never hides a failure). The process
   exits with the number of failed tests (capped at 125), so make and CI see red;
   registering more than HARNESS_MAX_TESTS tests, or a name filter that matches
   none, is a failure too. Before the closing line, a failing run repeats its
   first failure. Run one test by name: ./test_x name_substring. */
#ifndef ESFT_TEST_HARNESS_H
#define ESFT_TEST_HARNESS_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct harness_test {
    const char *name;
    void (*fn)(void);
} harness_test;

#ifndef HARNESS_MAX_TESTS
#define HARNESS_MAX_TESTS 512
#endif
static harness_test harness_tests[HARNESS_MAX_TESTS];
static int harness_n_tests;
static int harness_n_dropped; /* registered past HARNESS_MAX_TESTS: reported as a failure */
static int harness_state;     /* 0 running/passed, 1 failed, 2 skipped */
static char harness_reason[512];
static char harness_note[300]; /* a SKIP that came after the failure, shown with it */

static void harness_register(const char *name, void (*fn)(void))
{
    if (harness_n_tests == HARNESS_MAX_TESTS) { harness_n_dropped++; return; }
    harness_tests[harness_n_tests].name = name;
    harness_tests[harness_n_tests].fn = fn;
    harness_n_tests++;
}

/* Self-registration: a constructor in C (GCC/Clang), a static object in C++. */
#ifdef __cplusplus
struct harness_registrar {
    harness_registrar(const char *n, void (*f)(void)) { harness_register(n, f); }
};
#define TEST(name)                                                        \
    static void test_##name(void);                                        \
    static harness_registrar harness_reg_##name(#name, test_##name);      \
    static void test_##name(void)
#else
#define TEST(name)                                                        \
    static void test_##name(void);                                        \
    __attribute__((constructor)) static void harness_reg_##name(void)     \
    {                                                                     \
        harness_register(#name, test_##name);                             \
    }                                                                     \
    static void test_##name(void)
#endif

/* Records the first failure of the running test (later ones would be its
   echoes) and returns from the function the check is in. */
#define HARNESS_FAIL_(...)                                                              \
    do {                                                                                \
        if (harness_state != 1) {                                                       \
            int harness_n_ = snprintf(harness_reason, sizeof harness_reason, "%s:%d: ", \
                                      __FILE__, __LINE__);                              \
            snprintf(harness_reason + harness_n_, sizeof harness_reason - harness_n_,  \
                     __VA_ARGS__);                                                      \
            harness_state = 1;                                                          \
        }                                                                               \
        return;                                                                         \
    } while (0)

#define CHECK(cond)                                                   \
    do {                                                              \
        if (!(cond)) HARNESS_FAIL_("check failed: %s", #cond);        \
    } while (0)

#define CHECK_MSG(cond, ...)                                          \
    do {                                                              \
        if (!(cond)) HARNESS_FAIL_(__VA_ARGS__);                      \
    } while (0)

#define CHECK_EQ_INT(a, b)                                                              \
    do {                                                                                \
        long long harness_a_ = (long long)(a), harness_b_ = (long long)(b);             \
        if (harness_a_ != harness_b_)                                                   \
            HARNESS_FAIL_("%s == %s failed: %lld != %lld", #a, #b, harness_a_, harness_b_); \
    } while (0)

#define CHECK_NEAR(a, b, tol)                                                           \
    do {                                                                                \
        double harness_a_ = (double)(a), harness_b_ = (double)(b);                      \
        if (!(fabs(harness_a_ - harness_b_) <= (double)(tol)))                          \
            HARNESS_FAIL_("%s ~ %s failed: %.9g vs %.9g (tol %g)", #a, #b, harness_a_,   \
                          harness_b_, (double)(tol));                                   \
    } while (0)

#define CHECK_STATUS(expr, want)                                                        \
    do {                                                                                \
        int harness_s_ = (int)(expr);                                                   \
        if (harness_s_ != (int)(want))                                                  \
            HARNESS_FAIL_("%s returned %d, wanted %s (%d)", #expr, harness_s_, #want,   \
                          (int)(want));                                                 \
    } while (0)

/* A skip after a failed check (in a helper) keeps the test FAILed. */
#define SKIP(...)                                                                 \
    do {                                                                          \
        if (harness_state == 1) {                                                 \
            snprintf(harness_note, sizeof harness_note, __VA_ARGS__);             \
        } else {                                                                  \
            snprintf(harness_reason, sizeof harness_reason, __VA_ARGS__);         \
            harness_state = 2;                                                    \
        }                                                                         \
        return;                                                                   \
    } while (0)

static int harness_run(int argc, char **argv)
{
    int i, passed = 0, failed = 0, skipped = 0, ran = 0;
    const char *only = argc > 1 ? argv[1] : NULL;
    char first[700] = "";
    if (harness_n_dropped) { /* before the tests: an unnoticed cut would lose their verdicts */
        snprintf(first, sizeof first, "harness: %d tests registered, over HARNESS_MAX_TESTS (%d): %d not run",
                 harness_n_tests + harness_n_dropped, HARNESS_MAX_TESTS, harness_n_dropped);
        printf("FAIL %s\n", first);
        failed++;
    }
    for (i = 0; i < harness_n_tests; i++) {
        const harness_test *t = &harness_tests[i];
        if (only && !strstr(t->name, only)) continue;
        ran++;
        harness_state = 0;
        harness_reason[0] = harness_note[0] = 0;
        t->fn();
        if (harness_state == 0) { passed++; printf("PASS %s\n", t->name); }
        else if (harness_state == 2) { skipped++; printf("SKIP %s: %s\n", t->name, harness_reason); }
        else {
            failed++;
            printf("FAIL %s\n     %s\n", t->name, harness_reason);
            if (harness_note[0]) printf("     (then asked to skip: %s)\n", harness_note);
            if (!first[0]) snprintf(first, sizeof first, "%s: %s", t->name, harness_reason);
        }
        fflush(stdout);
    }
    if (only && ran == 0) {
        snprintf(first, sizeof first, "harness: no test name contains '%s'", only);
        printf("FAIL %s\n", first);
        failed++;
    }
    if (failed) printf("first failure: %s\n", first);
    printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
    return failed > 125 ? 125 : failed;
}

#define HARNESS_MAIN() \
    int main(int argc, char **argv) { return harness_run(argc, argv); }

#endif
