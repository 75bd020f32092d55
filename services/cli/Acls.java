// Makes the broker's ACLs exactly the given set (idempotent), or lists them.
// Run by `frs acl apply` with Java's single-file source launcher, on the broker's own jars
// (aiokafka has no ACL API):
//   java -cp "$jars/*" Acls.java apply ADMIN_PROPERTIES < bindings.tsv
//   java -cp "$jars/*" Acls.java list ADMIN_PROPERTIES
// A binding line: RESOURCE_TYPE PATTERN_TYPE NAME PRINCIPAL OPERATION (tab-separated),
// e.g. "TOPIC LITERAL frs.probe.requests User:intake READ"; every binding is ALLOW on any host.
// apply creates the missing ones and deletes every ACL not in the set, then prints
// {"created": n, "deleted": n, "unchanged": n}.
import java.io.BufferedReader;
import java.io.FileInputStream;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collection;
import java.util.HashSet;
import java.util.List;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclBindingFilter;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;

public class Acls {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        try (FileInputStream in = new FileInputStream(args[1])) {
            props.load(in);
        }
        props.put("default.api.timeout.ms", "30000");
        try (Admin admin = Admin.create(props)) {
            Collection<AclBinding> existing =
                admin.describeAcls(AclBindingFilter.ANY).values().get(30, TimeUnit.SECONDS);
            if (args[0].equals("list")) {
                for (AclBinding b : existing) {
                    System.out.println(line(b));
                }
                return;
            }
            Set<AclBinding> wanted = new HashSet<>();
            BufferedReader reader = new BufferedReader(
                new InputStreamReader(System.in, StandardCharsets.UTF_8));
            for (String text = reader.readLine(); text != null; text = reader.readLine()) {
                if (text.isBlank()) {
                    continue;
                }
                String[] f = text.strip().split("\t");
                wanted.add(new AclBinding(
                    new ResourcePattern(ResourceType.fromString(f[0]), f[2], PatternType.fromString(f[1])),
                    new AccessControlEntry(f[3], "*", AclOperation.fromString(f[4]),
                                           AclPermissionType.ALLOW)));
            }
            List<AclBinding> create = new ArrayList<>();
            for (AclBinding b : wanted) {
                if (!existing.contains(b)) {
                    create.add(b);
                }
            }
            List<AclBindingFilter> delete = new ArrayList<>();
            for (AclBinding b : existing) {
                if (!wanted.contains(b)) {
                    delete.add(b.toFilter());
                }
            }
            if (!create.isEmpty()) {
                admin.createAcls(create).all().get(30, TimeUnit.SECONDS);
            }
            if (!delete.isEmpty()) {
                admin.deleteAcls(delete).all().get(30, TimeUnit.SECONDS);
            }
            System.out.println("{\"created\": " + create.size() + ", \"deleted\": " + delete.size()
                + ", \"unchanged\": " + (wanted.size() - create.size()) + "}");
        }
    }

    private static String line(AclBinding b) {
        return String.join("\t", b.pattern().resourceType().name(), b.pattern().patternType().name(),
            b.pattern().name(), b.entry().principal(), b.entry().operation().name(),
            b.entry().permissionType().name(), b.entry().host());
    }
}
