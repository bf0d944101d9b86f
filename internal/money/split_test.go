package money

import (
	"math"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestSplit(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		total int64
		n     int
		to    Remainder
		want  []int64
	}{
		{"even", 900, 3, First, []int64{300, 300, 300}},
		{"remainder first", 1000, 3, First, []int64{334, 333, 333}},
		{"remainder last", 1000, 3, Last, []int64{333, 333, 334}},
		{"one part", 12345, 1, Last, []int64{12345}},
		{"remainder of n-1", 11, 6, First, []int64{6, 1, 1, 1, 1, 1}},
		{"one minor unit each", 4, 4, First, []int64{1, 1, 1, 1}},
		{"zero-decimal yen", 10000, 3, Last, []int64{3333, 3333, 3334}},
		{"three-decimal dinar", 1001, 2, First, []int64{501, 500}},
		{"fewer units than parts", 2, 3, Last, []int64{0, 0, 2}},
		{"zero total", 0, 2, First, []int64{0, 0}},
		{"largest total", math.MaxInt64, 2, First, []int64{math.MaxInt64/2 + 1, math.MaxInt64 / 2}},
		{"1000 installments", 100_000_007, 1000, Last, append(slices.Repeat([]int64{100_000}, 999), 100_007)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got := Split(tc.total, tc.n, tc.to)
			require.Equal(t, tc.want, got)
			var sum int64
			for _, p := range got {
				sum += p
			}
			require.Equal(t, tc.total, sum, "parts must add up to the total")
		})
	}
}

// TestSplitAddsUp checks the invariant over a range of totals and counts: the parts add up,
// differ by at most the remainder, and only the named part carries it.
func TestSplitAddsUp(t *testing.T) {
	t.Parallel()
	for total := int64(1); total <= 400; total += 7 {
		for n := 1; n <= 40; n++ {
			for _, to := range []Remainder{First, Last} {
				parts := Split(total, n, to)
				require.Len(t, parts, n)
				var sum int64
				for _, p := range parts {
					sum += p
				}
				require.Equal(t, total, sum, "Split(%d, %d, %v)", total, n, to)
				carrier := 0
				if to == Last {
					carrier = n - 1
				}
				for i, p := range parts {
					if i != carrier {
						require.Equal(t, total/int64(n), p, "Split(%d, %d, %v)[%d]", total, n, to, i)
					}
				}
			}
		}
	}
}

func TestSplitPanicsOnProgrammingErrors(t *testing.T) {
	t.Parallel()
	require.Panics(t, func() { Split(100, 0, First) })
	require.Panics(t, func() { Split(-1, 2, First) })
	require.Panics(t, func() { Split(100, 2, Remainder(7)) })
}

func TestParseRemainder(t *testing.T) {
	t.Parallel()
	for _, r := range []Remainder{First, Last} {
		got, err := ParseRemainder(r.String())
		require.NoError(t, err)
		require.Equal(t, r, got)
	}
	_, err := ParseRemainder("middle")
	require.Error(t, err)
}
