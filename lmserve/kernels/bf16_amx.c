/* The bf16 tiles' product on AMX (Intel's tile matrix unit, Sapphire Rapids and later).
 *
 * One tdpbf16ps multiplies a 16 x 32 bf16 tile of x by a 32 x 16 tile of weights into a 16 x 16 float32 tile: 8192
 * multiply-adds, 16x a vdpbf16ps. The weights' tiles need no repacking: AMX wants B as [K / 2][16 columns][2], which
 * is exactly pack_bf16's layout, so a 16-column tile's 32 inputs are 16 consecutive 64-byte rows. A micro-tile is
 * up to 32 rows x 32 columns (4 accumulator tiles, 2 of x, 2 of weights: all 8 tile registers); x's rows past M are
 * read from the scratch's padding (bf16_scratch_values) and their outputs dropped.
 *
 * Linux hands out AMX state per process on request (amx_enable); each thread loads the tile configuration before
 * its first tile instruction and releases it after its last, so other users of AMX on the same threads (oneDNN in
 * torch) find a clean state.
 */
#include <immintrin.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "bf16_kernels.h"
#include "simd.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-bf16")

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* 1 when the kernel grants this process AMX's tile state (Linux 5.16+), else 0. */
int amx_enable(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

/* Every tile register as 16 rows of 64 bytes. A constant, not built on the stack: gcc 12 drops the zeroing of the
 * stack copy's unused entries (it does not see ldtilecfg read all 64 bytes), and a non-zero one faults. */
static const TileConfig all_tiles_16x64 = {
    .palette = 1,
    .bytes_per_row = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {16, 16, 16, 16, 16, 16, 16, 16},
};

void amx_begin(void) { _tile_loadconfig(&all_tiles_16x64); }

void amx_end(void) { _tile_release(); }

/* rows (1..32) x (cols * 16) outputs, cols 1 or 2, over all of K (a multiple of 32); `two_x` (rows > 16), `cols`
 * and `epilogue` (bf16_kernels.h; SILU_MUL pairs the two column tiles) are constants after inlining. xb: bf16 rows
 * at stride K, 32 of them readable. w: the first column tile; the second starts `tile` values on. */
static inline __attribute__((always_inline)) void micro_tile(const uint16_t *xb, int64_t K, const uint16_t *w,
                                                             int64_t tile, const int two_x, const int cols, int rows,
                                                             const float *bias, float *y, int64_t y_stride,
                                                             const int epilogue) {
    static const float zeros[16];
    float out[32][32] __attribute__((aligned(64)));
    /* Whole tiles go straight to y (and, accumulating, start from it); the rest through `out`. */
    const int whole = rows == (two_x ? 32 : 16) && epilogue != SILU_MUL && !(epilogue == ACCUMULATE && bias);
    if (whole && epilogue == ACCUMULATE) {
        _tile_loadd(0, y, y_stride * 4);
        if (cols == 2) _tile_loadd(1, y + 16, y_stride * 4);
        if (two_x) _tile_loadd(2, y + 16 * y_stride, y_stride * 4);
        if (two_x && cols == 2) _tile_loadd(3, y + 16 * y_stride + 16, y_stride * 4);
    } else { /* sums start from the bias: a tile load with stride 0 repeats one 64-byte row in all 16 */
        const float *b0 = bias ? bias : zeros, *b1 = bias && cols == 2 ? bias + 16 : zeros;
        _tile_loadd(0, b0, 0);
        _tile_loadd(1, b1, 0);
        _tile_loadd(2, b0, 0);
        _tile_loadd(3, b1, 0);
    }
    for (int64_t k = 0; k < K; k += 32) {
        _tile_loadd(4, xb + k, K * 2);
        _tile_loadd(6, w + k * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (cols == 2) {
            _tile_loadd(7, w + tile + k * 16, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (two_x) {
            _tile_loadd(5, xb + 16 * K + k, K * 2);
            _tile_dpbf16ps(2, 5, 6);
            if (cols == 2) _tile_dpbf16ps(3, 5, 7);
        }
    }
    float *dst = whole ? y : &out[0][0];
    const int64_t stride = whole ? y_stride : 32;
    _tile_stored(0, dst, stride * 4);
    if (cols == 2) _tile_stored(1, dst + 16, stride * 4);
    if (two_x) {
        _tile_stored(2, dst + 16 * stride, stride * 4);
        if (cols == 2) _tile_stored(3, dst + 16 * stride + 16, stride * 4);
    }
    for (int r = 0; !whole && r < rows; r++) {
        float *row = y + r * y_stride;
        if (epilogue == SILU_MUL) {
            _mm512_storeu_ps(row, silu_mul16(_mm512_load_ps(&out[r][0]), _mm512_load_ps(&out[r][16])));
            continue;
        }
        for (int c = 0; c < cols; c++) {
            const __m512 sums = _mm512_load_ps(&out[r][c * 16]);
            _mm512_storeu_ps(row + c * 16, epilogue == ACCUMULATE ? _mm512_add_ps(sums, _mm512_loadu_ps(row + c * 16))
                                                                  : sums);
        }
    }
}

#define MICRO_TILE(two_x, cols, epilogue) micro_tile(xb, K, w, tile, two_x, cols, rows, bias, y, y_stride, epilogue)
#define MICRO_TILE_COLS(two_x, epilogue)                                                                             \
    do {                                                                                                             \
        if (cols == 2) MICRO_TILE(two_x, 2, epilogue);                                                               \
        else MICRO_TILE(two_x, 1, epilogue);                                                                         \
    } while (0)

/* SILU_MUL: cols is 2 (a gate tile and its up tile) and y is 16 wide. */
void amx_tile(const uint16_t *xb, int64_t K, const uint16_t *w, int64_t tile, int rows, int cols, const float *bias,
              float *y, int64_t y_stride, int epilogue) {
    const int two_x = rows > 16;
    if (epilogue == SILU_MUL) {
        if (two_x) MICRO_TILE(1, 2, SILU_MUL);
        else MICRO_TILE(0, 2, SILU_MUL);
    } else if (epilogue == ACCUMULATE) {
        if (two_x) MICRO_TILE_COLS(1, ACCUMULATE);
        else MICRO_TILE_COLS(0, ACCUMULATE);
    } else {
        if (two_x) MICRO_TILE_COLS(1, STORE);
        else MICRO_TILE_COLS(0, STORE);
    }
}

#pragma GCC pop_options
