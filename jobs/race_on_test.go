//go:build race

package jobs_test

// raceEnabled is true when the tests run under the race detector, which makes them several
// times slower: the stress tests size themselves down to finish in under a minute.
const raceEnabled = true
