/* One kernel call split into `parts` contiguous parts of [0, total), part p being
 * [total p / parts, total (p + 1) / parts) as tbfunc._parallel.split cuts them, each part run
 * by one thread of the OpenMP team where the library is built with -fopenmp (else one after
 * another in the calling thread). tbfunc builds with -fopenmp only where torch's own OpenMP
 * runtime (libgomp.so.1) is loaded, so the team is torch's: the threads torch's last op left
 * spinning take the parts at once. A pool of tbfunc's own threads instead competed with those
 * spinning threads for the cores, and its kernels ran no faster on two threads than on one in
 * a training step. Each part computes exactly what the pool's part computed, so the results do
 * not depend on the route or on which thread runs which part. */

#ifndef TBFUNC_PARTS_H
#define TBFUNC_PARTS_H

#include <stdint.h>

#if defined(_OPENMP)
#define TB_TEAM_PRAGMA _Pragma("omp parallel for schedule(static, 1) num_threads((int)parts)")
#else
#define TB_TEAM_PRAGMA
#endif

/* Runs CALL with `part`, `begin` and `end` in scope, for every part. */
#define OVER_PARTS(total, parts, CALL)                                     \
    do {                                                                   \
        TB_TEAM_PRAGMA                                                     \
        for (int64_t part = 0; part < (parts); part++) {                   \
            int64_t begin = (total) * part / (parts);                      \
            int64_t end = (total) * (part + 1) / (parts);                  \
            CALL;                                                          \
        }                                                                  \
    } while (0)

#endif
