// Returns 0 once the cluster answers a metadata request (describeCluster) that lists at
// least MIN_NODES brokers (default 1), 1 on timeout. Run by broker.sh and cluster.sh with
// Java's single-file source launcher, on the broker's own jars.
//   WaitReady BOOTSTRAP SECONDS [CLIENT_PROPERTIES|-] [MIN_NODES]
//   (CLIENT_PROPERTIES: TLS settings, secured mode; "-" for none)
import java.io.FileInputStream;
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;

public class WaitReady {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0];
        long deadline = System.currentTimeMillis() + Long.parseLong(args[1]) * 1000L;
        int minNodes = args.length > 3 ? Integer.parseInt(args[3]) : 1;
        Properties props = new Properties();
        if (args.length > 2 && !args[2].isEmpty() && !args[2].equals("-")) {
            try (FileInputStream in = new FileInputStream(args[2])) {
                props.load(in);
            }
        }
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "2000");
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "3000");
        int seen = 0;
        while (System.currentTimeMillis() < deadline) {
            try (Admin admin = Admin.create(props)) {
                seen = admin.describeCluster().nodes().get(3, TimeUnit.SECONDS).size();
                if (seen >= minNodes) {
                    System.out.println("broker ready at " + bootstrap + " (" + seen + " nodes)");
                    return;
                }
            } catch (Exception e) {
                // not up yet
            }
            Thread.sleep(300);
        }
        System.err.println("broker at " + bootstrap + " did not list " + minNodes
            + " nodes in a metadata answer in time (last saw " + seen + ")");
        System.exit(1);
    }
}
