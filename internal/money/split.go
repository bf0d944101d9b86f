package money

import "fmt"

// Remainder says which part of a split takes the minor units that do not divide evenly.
type Remainder int

const (
	// First gives the remainder to the first part (installment 1).
	First Remainder = iota
	// Last gives the remainder to the last part (installment n).
	Last
)

// String returns "first" or "last", the spelling billing.installment_plans uses.
func (r Remainder) String() string {
	switch r {
	case First:
		return "first"
	case Last:
		return "last"
	default:
		return fmt.Sprintf("Remainder(%d)", int(r))
	}
}

// ParseRemainder reads "first" or "last".
func ParseRemainder(s string) (Remainder, error) {
	switch s {
	case "first":
		return First, nil
	case "last":
		return Last, nil
	default:
		return 0, fmt.Errorf("remainder %q: want first or last", s)
	}
}

// Split divides total (in minor units) into n parts that add up to total exactly: every part is
// total/n, and the total%n minor units left over go to the part that remainderTo names, so
// nothing is lost or invented. Split(1000, 3, First) is [334 333 333]; Split(1000, 3, Last) is
// [333 333 334]. For a zero-decimal currency such as JPY the minor unit is the yen itself.
//
// n must be at least 1 and total must not be negative; Split panics otherwise, as these are
// programming errors (billing.create_installment_plan rejects such input before it is stored).
// When total < n some parts are 0; installment plans require total >= n so that none is.
func Split(total int64, n int, remainderTo Remainder) []int64 {
	if n < 1 {
		panic(fmt.Sprintf("money.Split: %d parts", n))
	}
	if total < 0 {
		panic(fmt.Sprintf("money.Split: negative total %d", total))
	}
	if remainderTo != First && remainderTo != Last {
		panic(fmt.Sprintf("money.Split: %v", remainderTo))
	}
	parts := make([]int64, n)
	base, rem := total/int64(n), total%int64(n)
	for i := range parts {
		parts[i] = base
	}
	if remainderTo == First {
		parts[0] += rem
	} else {
		parts[n-1] += rem
	}
	return parts
}
