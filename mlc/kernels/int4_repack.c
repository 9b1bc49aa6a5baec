/* compressed-tensors 4-bit words straight to torch's CPU int4 tiles, for loading a quantised model
 * (mlc/kernels/packing.py int4pack_from_words). Built on its own by mlc/kernels/native.py; portable C
 * (no intrinsics), so it builds wherever a C compiler does.
 *
 * In: int32 words [N][wpr], row r's column c at bits 4*(c%8) of word c/8, as the unsigned u = q + 8.
 * Out: torch's `_convert_weight_to_int4pack_for_cpu` layout, [N/64][K][32] bytes: for a tile of 64 rows
 * and a column kk, byte j holds row j's u in its low nibble and row j + 32's in its high nibble.
 * Both hold the same unsigned nibbles, so the repack is a transpose of nibbles, no arithmetic: per word,
 * the low nibbles of rows j and j + 32 give the even columns' bytes, the high nibbles the odd ones'.
 * One read of the words and one write of the tiles, with a block of the tile kept in L1 while it is
 * written; nothing [N, K] in between. Needs N % 64 == 0 and K % 8 == 0 (the caller checks).
 */
#include <stdint.h>

#define WORDS_PER_BLOCK 16 /* one 64-byte line of each of the tile's 64 rows; 4 KiB of output */

void mlc_int4pack_from_words(const uint32_t *words, uint8_t *tiles, int64_t n, int64_t k, int64_t wpr, int threads) {
    const int64_t used = k / 8, blocks = (used + WORDS_PER_BLOCK - 1) / WORDS_PER_BLOCK;
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int64_t t = 0; t < n / 64; t++) {
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t w0 = b * WORDS_PER_BLOCK, w1 = w0 + WORDS_PER_BLOCK < used ? w0 + WORDS_PER_BLOCK : used;
            uint8_t *tile = tiles + t * k * 32;
            for (int64_t j = 0; j < 32; j++) {
                const uint32_t *lo_row = words + (t * 64 + j) * wpr, *hi_row = lo_row + 32 * wpr;
                for (int64_t w = w0; w < w1; w++) {
                    const uint32_t lo = lo_row[w], hi = hi_row[w];
                    const uint32_t even = (lo & 0x0F0F0F0Fu) | ((hi & 0x0F0F0F0Fu) << 4); /* columns 8w, 8w+2, 8w+4, 8w+6 */
                    const uint32_t odd = ((lo >> 4) & 0x0F0F0F0Fu) | (hi & 0xF0F0F0F0u);  /* columns 8w+1, 8w+3, ... */
                    uint8_t *dst = tile + w * 8 * 32 + j;
                    dst[0] = (uint8_t)even;
                    dst[32] = (uint8_t)odd;
                    dst[64] = (uint8_t)(even >> 8);
                    dst[96] = (uint8_t)(odd >> 8);
                    dst[128] = (uint8_t)(even >> 16);
                    dst[160] = (uint8_t)(odd >> 16);
                    dst[192] = (uint8_t)(even >> 24);
                    dst[224] = (uint8_t)(odd >> 24);
                }
            }
        }
    }
}
