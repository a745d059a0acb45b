/* gradcheck.h - central finite differences in double precision for any fp32
   parameter array, to check a hand-written backward against its forward.

   Usage:
       static double my_loss(void *ctx) { ... run the forward, return the scalar loss
                                          in double, or NAN to reject this point ... }
       gc_result r = gc_check(params, n, analytic_grad, 1, my_loss, &ctx, &gc_default);
       CHECK_MSG(r.failed == 0, "%s", gc_describe(&r, "dW", buf, sizeof buf));

   For each checked coordinate i the parameter is set to p+h and p-h (as floats),
   the loss is evaluated at both, and the derivative is (L+ - L-) / (actual step),
   the actual step being the difference of the two rounded floats. The analytic
   value a passes when |a - num| <= atol + rtol * |num|. A loss of NAN at either
   point (e.g. the perturbation changed a discrete top-k choice) skips the
   coordinate and counts it in `skipped`. The parameter is restored bit-exactly.
   stride > 1 checks every stride-th coordinate (large tensors). */
#ifndef ESFT_TEST_GRADCHECK_H
#define ESFT_TEST_GRADCHECK_H

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

typedef double (*gc_loss_fn)(void *ctx);

typedef struct gc_options {
    double h;    /* perturbation */
    double atol; /* absolute tolerance */
    double rtol; /* relative tolerance */
} gc_options;

typedef struct gc_result {
    size_t checked, skipped, failed;
    size_t worst;          /* coordinate with the largest excess over tolerance */
    double worst_num, worst_ana, worst_err;
    double max_abs_grad;   /* largest |numeric| seen: a check of all zeros proves little */
} gc_result;

/* Central difference of loss with respect to p[i]; NAN if rejected. */
static double gc_numeric(float *p, size_t i, gc_loss_fn loss, void *ctx, double h)
{
    float orig = p[i], plus = (float)(orig + h), minus = (float)(orig - h);
    double lp, lm;
    p[i] = plus;
    lp = loss(ctx);
    p[i] = minus;
    lm = loss(ctx);
    p[i] = orig;
    if (isnan(lp) || isnan(lm)) return NAN;
    return (lp - lm) / ((double)plus - (double)minus);
}

static gc_result gc_check(float *p, size_t n, const float *analytic, size_t stride, gc_loss_fn loss,
                          void *ctx, const gc_options *o)
{
    gc_result r;
    size_t i;
    double worst_excess = -1.0;
    memset(&r, 0, sizeof r);
    if (stride < 1) stride = 1;
    for (i = 0; i < n; i += stride) {
        double num = gc_numeric(p, i, loss, ctx, o->h), a = analytic[i], err, tol;
        if (isnan(num)) { r.skipped++; continue; }
        r.checked++;
        err = fabs(a - num);
        tol = o->atol + o->rtol * fabs(num);
        if (fabs(num) > r.max_abs_grad) r.max_abs_grad = fabs(num);
        if (!(err <= tol)) r.failed++;
        if (err - tol > worst_excess) {
            worst_excess = err - tol;
            r.worst = i;
            r.worst_num = num;
            r.worst_ana = a;
            r.worst_err = err;
        }
    }
    return r;
}

/* One line for a failure message. */
static const char *gc_describe(const gc_result *r, const char *name, char *buf, size_t cap)
{
    snprintf(buf, cap, "%s: %lu of %lu coordinates off (skipped %lu); worst [%lu] analytic %.8g numeric %.8g err %.3g",
             name, (unsigned long)r->failed, (unsigned long)r->checked, (unsigned long)r->skipped,
             (unsigned long)r->worst, r->worst_ana, r->worst_num, r->worst_err);
    return buf;
}

#endif
