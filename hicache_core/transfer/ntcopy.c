/* Copies of many equal pieces between two buffers, with non-temporal (streaming) stores on x86-64.
 *
 * glibc's memcpy streams only copies larger than its non-temporal threshold (288 MiB on this project's VM); a KV
 * page moves in pieces of 1-128 KiB, so every cache line written is first read into the cache (write-allocate):
 * three memory passes per byte where a large contiguous copy takes two. Built by hicache_core/transfer/native.py
 * with the machine's C compiler on first use; no Python API, called through ctypes (which drops the GIL). */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__SSE2__)
#include <emmintrin.h>
#include <xmmintrin.h>

/* No software prefetch inside a piece: the hardware prefetcher follows a sequential read. A prefetchnta 2 KiB
 * ahead of each line here held 128 KiB pieces (MHA and MLA layer_first) to 0.59-0.64x of a contiguous copy on an
 * AMX Xeon VM (bench transfer); without it they run at 1.10-1.34x, and the short page_first pieces gain too. */
static void copy_stream(char *dst, const char *src, size_t n) {
    size_t head = (size_t)((16 - ((uintptr_t)dst & 15)) & 15);
    if (head > n) head = n;
    memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    for (; n >= 64; n -= 64, src += 64, dst += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)src);
        __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + 48));
        _mm_stream_si128((__m128i *)dst, a);
        _mm_stream_si128((__m128i *)(dst + 16), b);
        _mm_stream_si128((__m128i *)(dst + 32), c);
        _mm_stream_si128((__m128i *)(dst + 48), d);
    }
    memcpy(dst, src, n);
}
#define HC_STREAMS 1
#else
#define HC_STREAMS 0
#endif

/* Piece i: `piece` bytes from src + src_off[i] to dst + dst_off[i]; streamed when `stream` and supported. */
void hc_copy_pieces(char *dst, const char *src, const int64_t *dst_off, const int64_t *src_off, int64_t count,
                    int64_t piece, int stream) {
#if HC_STREAMS
    /* pieces lie at random: ask for the first lines of a piece some 4 KiB ahead while this one copies (measured
     * on small page_first pieces, 1152 B: 1 piece ahead 26.7 GB/s, 2 ahead 29, 4 ahead 29.8, 8 ahead 26.8) */
    int64_t ahead = piece >= 4096 ? 1 : (4096 + piece - 1) / piece;
    for (int64_t i = 0; i < count; i++) {
        if (i + ahead < count)
            for (int k = 0; k < 2048 && k < piece; k += 64) _mm_prefetch(src + src_off[i + ahead] + k, _MM_HINT_T0);
        if (stream)
            copy_stream(dst + dst_off[i], src + src_off[i], (size_t)piece);
        else
            memcpy(dst + dst_off[i], src + src_off[i], (size_t)piece);
    }
    if (stream) _mm_sfence();
#else
    (void)stream;
    for (int64_t i = 0; i < count; i++) memcpy(dst + dst_off[i], src + src_off[i], (size_t)piece);
#endif
}
