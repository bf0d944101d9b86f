package jobs_test

import (
	"testing"

	"github.com/billingd/billingd/internal/dbtest"
)

func TestMain(m *testing.M) { dbtest.Main(m) }
